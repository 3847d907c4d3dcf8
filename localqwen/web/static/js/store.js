// Conversations: kept in this browser's IndexedDB (per origin, so they outlive reloads and server restarts),
// and written to / read from JSON files. An imported file is untrusted: only known fields of the right types are
// kept, and everything is shown as text or through the sanitiser.

import { readSteps, readTurn } from "./agent.js";
import { SETTING_TYPES } from "./settings.js";

const DB_NAME = "localqwen";
const STORE = "conversations";
export const FILE_FORMAT = "localqwen-conversation";
const FILE_VERSION = 1;
const MESSAGE_TEXT = ["content", "reasoning", "finish_reason", "error"];
const STAT_NAMES = [
  "prompt_tokens", "completion_tokens", "thinking_tokens", "thinking_deltas", "ttft_s", "thinking_s", "total_s",
  "tokens_per_s",
];

let database;

function open() {
  database ??= new Promise((resolve, reject) => {
    const request = indexedDB.open(DB_NAME, 1);
    request.onupgradeneeded = () => request.result.createObjectStore(STORE, { keyPath: "id" });
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
  return database;
}

async function run(mode, action) {
  const db = await open();
  return new Promise((resolve, reject) => {
    const transaction = db.transaction(STORE, mode);
    const request = action(transaction.objectStore(STORE));
    transaction.oncomplete = () => resolve(request.result);
    transaction.onerror = () => reject(transaction.error);
  });
}

/** All conversations, the most recently updated first. */
export const listConversations = async () =>
  (await run("readonly", (store) => store.getAll())).sort((a, b) => b.updated - a.updated);
export const saveConversation = (conversation) => run("readwrite", (store) => store.put(conversation));
export const deleteConversation = (id) => run("readwrite", (store) => store.delete(id));

// (crypto.randomUUID exists only in secure contexts: not on plain http to a LAN address.)
const newId = () => Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0"))
  .join("");

export function newConversation() {
  const now = Date.now();
  return { id: newId(), title: "", created: now, updated: now, settings: {}, messages: [] };
}

/** The conversation as a file: everything but its id (an import gets a new one). */
export function toFile(conversation) {
  const { title, created, updated, settings, messages } = conversation;
  return { format: FILE_FORMAT, version: FILE_VERSION, title, created, updated, settings, messages };
}

/** Save the conversation as a JSON file, through the browser's download. */
export function downloadConversation(conversation) {
  const blob = new Blob([JSON.stringify(toFile(conversation), null, 2)], { type: "application/json" });
  const name = (conversation.title || "conversation").replace(/[^\p{L}\p{N}]+/gu, "-").replace(/^-|-$/g, "").slice(0, 60);
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `${name || "conversation"}.json`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}

class FormatError extends Error {}

function check(ok, where, what) {
  if (!ok) throw new FormatError(`${where} ${what}`);
}

const isObject = (value) => typeof value === "object" && value !== null && !Array.isArray(value);

function pick(source, types, where) {
  const out = {};
  for (const [name, type] of Object.entries(types)) {
    if (source[name] === undefined || source[name] === null) continue;
    check(typeof source[name] === type && (type !== "number" || Number.isFinite(source[name])),
      `${where}.${name}`, `must be a ${type}`);
    out[name] = source[name];
  }
  return out;
}

function readMessage(message, where) {
  check(isObject(message), where, "must be an object");
  check(message.role === "user" || message.role === "assistant", `${where}.role`, "must be user or assistant");
  check(typeof message.content === "string", `${where}.content`, "must be text");
  const out = { role: message.role, ...pick(message, Object.fromEntries(MESSAGE_TEXT.map((n) => [n, "string"])), where) };
  if (message.stopped === true) out.stopped = true;
  if (message.role === "assistant" && message.stats !== undefined) {
    check(isObject(message.stats), `${where}.stats`, "must be an object");
    out.stats = pick(message.stats, Object.fromEntries(STAT_NAMES.map((n) => [n, "number"])), `${where}.stats`);
  }
  // A turn through the tool loop (serve --mcp): its calls as shown, and the messages it sends back.
  if (message.role === "assistant" && message.tools !== undefined) out.tools = readSteps(message.tools, `${where}.tools`);
  if (message.role === "assistant" && message.turn !== undefined) out.turn = readTurn(message.turn, `${where}.turn`);
  return out;
}

/** A conversation from a file's parsed JSON; throws an Error naming the first bad field. */
export function fromFile(data) {
  check(isObject(data) && data.format === FILE_FORMAT, "the file", `is not a ${FILE_FORMAT} (no "format" field)`);
  check(data.version === FILE_VERSION, "version", `${JSON.stringify(data.version)} is not supported`);
  check(typeof data.title === "string", "title", "must be text");
  check(Array.isArray(data.messages), "messages", "must be a list");
  check(data.settings === undefined || isObject(data.settings), "settings", "must be an object");
  const conversation = newConversation();
  conversation.title = data.title.slice(0, 200);
  for (const name of ["created", "updated"]) {
    if (Number.isFinite(data[name])) conversation[name] = data[name];
  }
  conversation.settings = pick(data.settings ?? {}, SETTING_TYPES, "settings");
  conversation.messages = data.messages.map((message, i) => readMessage(message, `messages[${i}]`));
  return conversation;
}
