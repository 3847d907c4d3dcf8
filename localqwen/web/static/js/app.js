// The chat page: conversations in the sidebar, the open one in the middle, a streamed reply at a time.

import { alwaysTools, answerCall, getTools, streamTurn, toolSchemas, turnMessages } from "./agent.js";
import { answerNow, ApiError, apiKey, countTokens, getProps } from "./api.js";
import { streamInto } from "./reply.js";
import { addEffortOptions, fillForm, readForm, requestFields } from "./settings.js";
import {
  deleteConversation, downloadConversation, fromFile, listConversations, newConversation, saveConversation,
} from "./store.js";
import { assistantView, userView } from "./view.js";

const $ = (id) => document.getElementById(id);
const ui = {
  body: document.body, sidebar: $("sidebar"), scrim: $("scrim"), list: $("conversations"), title: $("title"),
  contextUse: $("context-use"), messages: $("messages"), composer: $("composer"), input: $("input"),
  send: $("send"), stop: $("stop"), answerNow: $("answer-now"), notice: $("notice"), modelName: $("model-name"),
  settings: $("settings"), settingsForm: $("settings-form"), keyDialog: $("key-dialog"), keyForm: $("key-form"),
  importFile: $("import-file"), exportButton: $("export"), toolsOption: $("tools-option"), useTools: $("use-tools"),
  toolsLabel: $("tools-label"),
};
const CURRENT_KEY = "localqwen.current";

let props;                // GET /props: model, context_length, defaults
let conversations = [];   // all stored, most recent first
let current;              // the conversation on screen (stored once it has a message)
let running = null;       // { conversation, message, controller, id, run } while a reply streams
let tools = [];           // the server's tools (serve --mcp): replies go through its tool loop while "Tools" is on
let checking = false;     // a message is being measured against the context, before it goes out
let views = new Map();    // message -> its view, for the conversation on screen

const count = (n) => n.toLocaleString("en");

// --- notices and the API key -----------------------------------------------------------------------------------

function notice(text, kind = "error") {
  ui.notice.hidden = !text;
  ui.notice.textContent = text ?? "";
  ui.notice.dataset.kind = kind;
}

function askForKey(reason) {
  $("key-reason").textContent = reason;
  ui.keyForm.reset();
  ui.keyDialog.returnValue = "";  // older browsers keep the last value when Esc closes a dialog
  ui.keyDialog.showModal();
  return new Promise((resolve) => {
    ui.keyDialog.addEventListener("close", () => {
      const key = new FormData(ui.keyForm).get("key")?.trim();
      if (ui.keyDialog.returnValue === "save" && key) apiKey.set(key);
      resolve(ui.keyDialog.returnValue === "save" && Boolean(key));
    }, { once: true });
  });
}

/** Run `call`; on a 401, ask for the key (kept in this browser) and try again, until it works or the user gives up. */
async function withKey(call) {
  for (;;) {
    try {
      return await call();
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 401)) throw error;
      const reason = apiKey.get() ? "The server refused this key: enter it again." : "This server needs an API key.";
      if (!(await askForKey(reason))) throw error;
    }
  }
}

// --- conversations ---------------------------------------------------------------------------------------------

async function persist(conversation, { touch = true } = {}) {
  if (touch) conversation.updated = Date.now();
  await saveConversation(conversation);
  if (!conversations.includes(conversation)) conversations.push(conversation);
  conversations.sort((a, b) => b.updated - a.updated);
  renderSidebar();
}

function clone(id) {
  return $(id).content.firstElementChild.cloneNode(true);
}

function renderSidebar() {
  ui.list.replaceChildren(...conversations.map((conversation) => {
    const item = clone("conversation-item");
    const open = item.querySelector(".open");
    open.textContent = conversation.title || "New chat";
    item.classList.toggle("current", conversation === current);
    open.addEventListener("click", () => openConversation(conversation));
    item.querySelector(".rename").addEventListener("click", () => rename(item, conversation));
    item.querySelector(".delete").addEventListener("click", () => remove(conversation));
    return item;
  }));
}

function rename(item, conversation) {
  const input = document.createElement("input");
  input.className = "rename-input";
  input.value = conversation.title;
  input.setAttribute("aria-label", "New name");
  item.querySelector(".open").replaceWith(input);
  input.focus();
  input.select();
  let finished = false;
  const finish = async (save) => {
    if (finished) return;
    finished = true;
    if (save && input.value.trim()) {
      conversation.title = input.value.trim().slice(0, 200);
      await persist(conversation, { touch: false });
    }
    renderSidebar();
    renderHeader();
  };
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") finish(true);
    if (event.key === "Escape") { event.stopPropagation(); finish(false); }
  });
  input.addEventListener("blur", () => finish(true));
}

async function remove(conversation) {
  if (!confirm(`Delete “${conversation.title || "New chat"}”?`)) return;
  if (running?.conversation === conversation) running.controller.abort();
  await deleteConversation(conversation.id);
  conversations = conversations.filter((c) => c !== conversation);
  if (conversation === current) openConversation(conversations[0] ?? newConversation());
  else renderSidebar();
}

function openConversation(conversation) {
  current = conversation;
  localStorage.setItem(CURRENT_KEY, conversation.id);
  ui.body.classList.remove("sidebar-open");
  notice(null);
  renderSidebar();
  renderHeader();
  renderMessages();
  updateContext();
}

function renderHeader() {
  ui.title.textContent = current.title || "New chat";
  document.title = current.title ? `${current.title} · localqwen` : "localqwen";
  ui.exportButton.disabled = current.messages.length === 0;
}

function titleFrom(text) {
  const line = text.trim().split("\n")[0];
  return line.length > 60 ? `${line.slice(0, 59)}…` : line;
}

// --- messages ----------------------------------------------------------------------------------------------------

function addView(message) {
  const view = message.role === "user"
    ? userView(message, { onEdit: editMessage })
    : assistantView(message, { onRegenerate: regenerate, onDecide: decide });
  views.set(message, view);
  ui.messages.append(view.element);
  if (running?.message === message) view.update({ live: true });
  return view;
}

function renderMessages() {
  views = new Map();
  ui.messages.replaceChildren();
  current.messages.forEach(addView);
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function refresh(message, live) {
  const view = views.get(message);
  if (!view) return;
  const box = ui.messages;
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  view.update({ live });
  if (atBottom) box.scrollTop = box.scrollHeight;
}

/** The conversation as the API wants it: the system prompt, then each turn's text (earlier thinking is dropped, as
 * the model card recommends; a reply stopped before its answer has nothing to send), tool calls and results included. */
function apiMessages(settings, messages) {
  const out = settings.system ? [{ role: "system", content: settings.system }] : [];
  for (const message of messages) {
    if (message.role === "user") out.push({ role: "user", content: message.content });
    else out.push(...turnMessages(message));
  }
  return out;
}

const toolsOn = () => tools.length > 0 && ui.useTools.checked;
const tokens = (messages) => countTokens(messages, toolsOn() ? toolSchemas(tools) : undefined);

async function updateContext() {
  const conversation = current;
  const messages = apiMessages(conversation.settings, conversation.messages);
  let used = 0;
  try {
    if (messages.length) used = await tokens(messages);
  } catch {
    ui.contextUse.textContent = "";
    return;
  }
  if (conversation !== current) return;
  ui.contextUse.textContent = `${count(used)} / ${count(props.context_length)} tokens`;
  ui.contextUse.classList.toggle("full", used > 0.9 * props.context_length);
}

/** Whether the prompt `messages` make fits the context; if not, say so with the numbers (the server's own rule). */
async function fits(messages) {
  const prompt = await withKey(() => tokens(messages));
  if (prompt < props.context_length) return true;
  notice(`This message does not fit: with the conversation it makes a prompt of ${count(prompt)} tokens, and the `
    + `model's context holds ${count(props.context_length)} (${count(prompt - props.context_length + 1)} too many). `
    + "Shorten it, or start a new chat.");
  return false;
}

/** Whether `text` may go out now as the next user message after `before`: nothing else running or being checked, and
 * it fits the context (else the notice says why). */
async function mayAsk(conversation, before, text) {
  if (running || checking || !text.trim()) return false;
  notice(null);
  checking = true;
  try {
    return await fits([...apiMessages(conversation.settings, before), { role: "user", content: text }]);
  } catch (error) {
    notice(error.message);
    return false;
  } finally {
    checking = false;
  }
}

async function send(text) {
  const conversation = current;
  if (!(await mayAsk(conversation, conversation.messages, text))) return;
  ui.input.value = "";
  autosize();
  const message = { role: "user", content: text };
  conversation.messages.push(message);
  conversation.title ||= titleFrom(text);
  if (conversation === current) {
    addView(message);
    renderHeader();
  }
  await reply(conversation);
}

function editMessage(message, element) {
  if (running || element.classList.contains("editing")) return;
  const box = clone("edit-box");
  const area = box.querySelector("textarea");
  area.value = message.content;
  const close = () => { box.remove(); element.classList.remove("editing"); };
  box.addEventListener("submit", (event) => {
    event.preventDefault();
    resend(message, area.value);
  });
  box.querySelector(".cancel").addEventListener("click", close);
  area.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      box.requestSubmit();
    } else if (event.key === "Escape") {
      event.stopPropagation();
      close();
    }
  });
  element.classList.add("editing");
  element.append(box);
  area.focus();
}

/** Replace a user message with `text`, drop everything after it, and ask again. */
async function resend(message, text) {
  const conversation = current;
  const index = conversation.messages.indexOf(message);
  const before = conversation.messages.slice(0, index);
  if (index < 0 || !(await mayAsk(conversation, before, text))) return;
  conversation.messages = [...before, { role: "user", content: text }];
  renderMessages();
  await reply(conversation);
}

async function regenerate(message) {
  const conversation = current;
  if (running || conversation.messages.at(-1) !== message) return;
  conversation.messages.pop();
  views.get(message)?.element.remove();
  views.delete(message);
  await reply(conversation);
}

function requestBody(conversation) {
  return { messages: apiMessages(conversation.settings, conversation.messages), ...requestFields(conversation.settings) };
}

/** Stream the model's reply to `conversation` (which ends with a user message) into a new assistant message. */
async function reply(conversation) {
  const body = requestBody(conversation);
  const message = { role: "assistant", content: "", reasoning: "" };
  conversation.messages.push(message);
  await persist(conversation);
  const controller = new AbortController();
  running = { conversation, message, controller, id: null, run: null };
  setRunning();
  if (conversation === current) addView(message);

  let frame = null;
  const scheduleRefresh = () => {
    frame ??= requestAnimationFrame(() => {
      frame = null;
      if (running?.message === message) refresh(message, true);
    });
  };
  try {
    await withKey(() => (toolsOn()
      ? streamTurn(message, { ...body, approved: alwaysTools.get() }, controller.signal, (run) => {
        running.run ??= run;
        scheduleRefresh();
      })
      : streamInto(message, body, controller.signal, (id) => {
        running.id ??= id;
        updateAnswerNow();
        scheduleRefresh();
      })));
    if (!message.finish_reason) message.error = "the connection closed before the reply finished";
  } catch (error) {
    if (controller.signal.aborted) message.stopped = true;
    else message.error = error.message;
  }
  running = null;
  setRunning();
  refresh(message, false);
  if (!conversations.includes(conversation)) return;  // deleted while it replied
  await persist(conversation);
  if (conversation === current) updateContext();
}

function stop() {
  running?.controller.abort();
}

/** The user's answer to a tool call that waits for approval: "allow", "always" (this tool, in this browser) or
 * "refuse". */
async function decide(message, step, decision) {
  if (running?.message !== message || !running.run || step.status !== "approval") return;
  if (decision === "always") alwaysTools.add(step.name);
  step.status = decision === "refuse" ? "refused" : "running";  // until the server's result comes
  refresh(message, true);
  try {
    await answerCall(running.run, step.id, decision !== "refuse", decision === "always");
  } catch (error) {
    notice(error.message);
  }
}

function setRunning() {
  ui.body.classList.toggle("running", Boolean(running));
  ui.send.hidden = Boolean(running);
  ui.stop.hidden = !running;
  updateAnswerNow();
}

function updateAnswerNow() {
  // Only while the model thinks, and only where the server can do it (/props says so).
  ui.answerNow.hidden = !(props?.answer_now && running?.id && !running.message.content);
}

// --- settings, export, import ------------------------------------------------------------------------------------

function openSettings() {
  fillForm(ui.settingsForm, current.settings, props);
  ui.settings.returnValue = "";  // older browsers keep the last Save when Esc closes a dialog
  ui.settings.showModal();
}

async function saveSettings() {
  if (ui.settings.returnValue !== "save") return;
  current.settings = readForm(ui.settingsForm);
  if (current.messages.length) await persist(current, { touch: false });
  updateContext();
}

async function importFiles(files) {
  let last = null;
  const problems = [];
  for (const file of files) {
    try {
      const conversation = fromFile(JSON.parse(await file.text()));
      await persist(conversation, { touch: false });
      last = conversation;
    } catch (error) {
      problems.push(`${file.name}: ${error.message}`);
    }
  }
  if (last) openConversation(last);
  notice(problems.length ? `Not imported: ${problems.join("; ")}` : null);
}

// --- wiring ------------------------------------------------------------------------------------------------------

function autosize() {
  ui.input.style.height = "auto";
  ui.input.style.height = `${Math.min(ui.input.scrollHeight, window.innerHeight / 3)}px`;
}

function wire() {
  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send(ui.input.value);
  });
  ui.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send(ui.input.value);
    }
  });
  ui.input.addEventListener("input", autosize);
  ui.useTools.addEventListener("change", updateContext);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && running && !document.querySelector("dialog[open]")) {
      event.preventDefault();
      stop();
    }
  });
  ui.stop.addEventListener("click", stop);
  ui.answerNow.addEventListener("click", () => {
    if (running?.id) answerNow(running.id).catch((error) => notice(error.message));
  });
  $("new-chat").addEventListener("click", () => openConversation(newConversation()));
  $("toggle-sidebar").addEventListener("click", () => ui.body.classList.toggle("sidebar-open"));
  ui.scrim.addEventListener("click", () => ui.body.classList.remove("sidebar-open"));
  $("open-settings").addEventListener("click", openSettings);
  ui.settings.addEventListener("close", saveSettings);
  $("settings-reset").addEventListener("click", () => {
    for (const element of ui.settingsForm.elements) if (element.name) element.value = "";
  });
  ui.exportButton.addEventListener("click", () => downloadConversation(current));
  $("import").addEventListener("click", () => ui.importFile.click());
  ui.importFile.addEventListener("change", async () => {
    await importFiles([...ui.importFile.files]);
    ui.importFile.value = "";
  });
}

async function boot() {
  wire();
  try {
    props = await withKey(getProps);  // in case /props itself wants the key
  } catch (error) {
    notice(`Cannot reach the localqwen server (${error.message}). Is \`localqwen serve\` running?`);
    return;
  }
  ui.modelName.textContent = `${props.model} · context ${count(props.context_length)} tokens`;
  addEffortOptions(ui.settingsForm.elements.reasoning_effort, props.reasoning_effort);
  if (props.api_key_required && !apiKey.get()) await askForKey("This server needs an API key.");
  tools = await getTools().catch(() => []);  // (a wrong key is asked for again when a message goes out)
  ui.toolsOption.hidden = tools.length === 0;
  ui.toolsLabel.textContent = `Tools (${tools.length})`;
  ui.toolsOption.title = tools.map((tool) => `${tool.name} (${tool.server || "python"}): ${tool.description}`).join("\n");
  conversations = await listConversations();
  const last = localStorage.getItem(CURRENT_KEY);
  openConversation(conversations.find((c) => c.id === last) ?? newConversation());
  ui.body.dataset.ready = "true";
  ui.input.focus();
}

boot();
