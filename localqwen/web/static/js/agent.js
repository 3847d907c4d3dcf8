// The server's tool loop (`localqwen serve --mcp`), as the page uses it: the tools on offer, one turn streamed into
// an assistant message (thinking, each tool call with its arguments, its approval and result, the answer), the user's
// answers to calls that wait, and the calls' DOM. The server runs the tools; the page only says yes or no.
// Tool names, arguments and results come from the model and the tools: they go into the page as text only.

import { ApiError, readEvents, request } from "./api.js";

const ALWAYS_KEY = "localqwen.alwaysTools";
const round = (x) => Math.round(x * 1000) / 1000;
const STATUS_TEXT = {
  called: "called", approval: "waits for your approval", running: "running", ok: "done", error: "failed",
  refused: "refused", stopped: "not run",
};

/** The server's tools: [{name, description, server, parameters}] (none without --mcp). */
export const getTools = async () => (await (await request("agent/tools")).json()).tools;

/** The tools as the chat template lists them (for counting the prompt's tokens). */
export const toolSchemas = (tools) => tools.map(({ name, description, parameters }) =>
  ({ type: "function", function: { name, description, parameters } }));

/** Tools whose calls run without asking, in this browser ("Always allow"). */
export const alwaysTools = {
  get() {
    try {
      const names = JSON.parse(localStorage.getItem(ALWAYS_KEY) ?? "[]");
      return Array.isArray(names) ? names.filter((name) => typeof name === "string") : [];
    } catch {
      return [];
    }
  },
  add(name) {
    localStorage.setItem(ALWAYS_KEY, JSON.stringify([...new Set([...this.get(), name])]));
  },
};

/** Answer a call that waits for approval in run `run`. */
export const answerCall = (run, call, approve, always = false) =>
  request(`agent/runs/${encodeURIComponent(run)}/calls/${encodeURIComponent(call)}`,
    { method: "POST", body: { approve, always } });

/**
 * Stream one turn of `body` through the tool loop into `message`: reasoning and content (each round's, a blank line
 * apart), tools (one step per call), finish_reason, stats, and `turn` (the messages the turn added, which the next
 * request sends back). onUpdate(run) after each event, with the run's id (for answerCall). Throws on an error.
 */
export async function streamTurn(message, body, signal, onUpdate) {
  const response = await request("agent/chat", { method: "POST", signal, body });
  const started = performance.now();
  const totals = { completion_tokens: 0, thinking_tokens: 0 };
  let run = null;
  let first = null;
  let answerAt = null;
  let thinkingDeltas = 0;
  let lastRound = { thinking: 0, content: 0 };
  message.tools = [];
  const append = (field, event) => {
    const fresh = lastRound[field] !== event.round;
    lastRound[field] = event.round;
    message[field] += (fresh && message[field] ? "\n\n" : "") + event.text;
  };
  const measure = (end) => {
    const stats = { ...totals, total_s: round((end - started) / 1000) };
    if (first !== null) stats.ttft_s = round((first - started) / 1000);
    if (message.reasoning) {
      stats.thinking_deltas = thinkingDeltas;
      stats.thinking_s = round(((answerAt ?? end) - first) / 1000);
    }
    if (totals.completion_tokens > 1 && end > first) {
      stats.tokens_per_s = round((totals.completion_tokens - 1) / ((end - first) / 1000));
    }
    return stats;
  };

  try {
    await readEvents(response, (event) => {
      const now = performance.now();
      const step = message.tools.find((s) => s.id === event.id);
      switch (event.type) {
        case "start": run = event.run; break;
        case "thinking": first ??= now; thinkingDeltas += 1; append("reasoning", event); break;
        case "content": first ??= now; answerAt ??= now; append("content", event); break;
        case "tool_call":
          message.tools.push({ id: event.id, name: event.name ?? "?", arguments: JSON.stringify(event.arguments ?? {}),
            status: event.error ? "error" : "called", result: event.error ?? "" });
          break;
        case "approval": if (step) step.status = "approval"; break;
        case "tool_result":
          if (step) Object.assign(step, { status: event.status, result: event.content,
            arguments: JSON.stringify(event.arguments ?? {}) });
          break;
        case "done":
          totals.completion_tokens += event.usage.completion_tokens;
          totals.thinking_tokens += event.usage.completion_tokens_details.reasoning_tokens;
          totals.prompt_tokens = event.usage.prompt_tokens;
          message.finish_reason = event.finish_reason === "tool_calls" ? null : event.finish_reason;
          break;
        case "end": message.finish_reason = event.finish_reason; message.turn = event.messages; break;
        case "error": throw new ApiError(500, event.message);
        default: break;
      }
      message.stats = measure(now);
      onUpdate(run);
    });
  } finally {
    for (const step of message.tools) if (["called", "approval", "running"].includes(step.status)) step.status = "stopped";
    message.stats = measure(performance.now());
  }
}

/** The messages the API gets for a stored assistant message: the turn's own, without the reasoning (the chat
 * template drops it for earlier turns anyway), or its answer. */
export function turnMessages(message) {
  if (!message.turn) return message.content ? [{ role: "assistant", content: message.content }] : [];
  return message.turn.map(({ reasoning_content: _, ...rest }) => rest);
}

// --- reading them from a file --------------------------------------------------------------------------------

const isObject = (value) => typeof value === "object" && value !== null && !Array.isArray(value);
const isText = (value) => typeof value === "string";

/** A stored message's tool steps from a file, or an Error naming the field. Only known fields, as text. */
export function readSteps(steps, where) {
  if (!Array.isArray(steps)) throw new Error(`${where} must be a list`);
  return steps.map((step, i) => {
    if (!isObject(step) || !["id", "name", "arguments", "status", "result"].every((k) => isText(step[k]))
        || !(step.status in STATUS_TEXT)) {
      throw new Error(`${where}[${i}] must have text id, name, arguments, result and a known status`);
    }
    const { id, name, arguments: args, status, result } = step;
    return { id, name, arguments: args, status, result };
  });
}

/** A stored turn's API messages from a file (the server checks them again when they are sent). */
export function readTurn(turn, where) {
  if (!Array.isArray(turn)) throw new Error(`${where} must be a list`);
  return turn.map((message, i) => {
    const ok = isObject(message) && ["assistant", "tool"].includes(message.role) && isText(message.content);
    if (!ok) throw new Error(`${where}[${i}] must be an assistant or tool message with text content`);
    const out = { role: message.role, content: message.content };
    for (const key of ["tool_call_id", "name", "reasoning_content"]) if (isText(message[key])) out[key] = message[key];
    if (Array.isArray(message.tool_calls)) {
      out.tool_calls = message.tool_calls.filter((call) => isObject(call) && isObject(call.function)
        && isText(call.id) && isText(call.function.name) && isText(call.function.arguments))
        .map((call) => ({ id: call.id, type: "function",
          function: { name: call.function.name, arguments: call.function.arguments } }));
    }
    return out;
  });
}

// --- the calls on screen -----------------------------------------------------------------------------------------

function stepElement(onDecide) {
  const element = document.getElementById("tool-step").content.firstElementChild.cloneNode(true);
  const buttons = element.querySelector(".tool-approval");
  for (const [selector, decision] of [[".allow", "allow"], [".always", "always"], [".refuse", "refuse"]]) {
    buttons.querySelector(selector).addEventListener("click", () => onDecide(element.step, decision));
  }
  return element;
}

/** Show `message.tools` in `container`: one element per call, updated in place (buttons keep their focus). */
export function renderSteps(container, message, onDecide) {
  const steps = message.tools ?? [];
  container.hidden = steps.length === 0;
  while (container.children.length > steps.length) container.lastElementChild.remove();
  steps.forEach((step, i) => {
    const element = container.children[i] ?? container.appendChild(stepElement((s, d) => onDecide(message, s, d)));
    element.step = step;
    element.dataset.status = step.status;
    element.querySelector(".tool-name").textContent = step.name;
    element.querySelector(".tool-args").textContent = step.arguments;
    element.querySelector(".tool-status").textContent = STATUS_TEXT[step.status] ?? step.status;
    element.querySelector(".tool-approval").hidden = step.status !== "approval";
    const result = element.querySelector(".tool-result");
    result.hidden = !step.result;
    if (result.querySelector("pre").textContent !== step.result) result.querySelector("pre").textContent = step.result;
  });
}
