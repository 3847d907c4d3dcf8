// The DOM of one message, built from the page's <template>s. Every text from the model or a file goes in as
// textContent, except the answer, which goes through renderMarkdown (the sanitiser).

import { renderSteps } from "./agent.js";
import { copyButton, renderMarkdown } from "./render.js";

const seconds = (s) => `${s < 10 ? s.toFixed(1) : Math.round(s)} s`;
const count = (n) => n.toLocaleString("en");

function clone(id) {
  return document.getElementById(id).content.firstElementChild.cloneNode(true);
}

/** "Thought for N tokens, X s": the server's exact count when the reply finished, else the deltas seen (~). */
function thinkingSummary(message, live) {
  const stats = message.stats ?? {};
  if (live && !message.content) return "Thinking…";
  const tokens = stats.thinking_tokens ?? (stats.thinking_deltas === undefined ? null : `~${count(stats.thinking_deltas)}`);
  const parts = [tokens === null ? null : `${typeof tokens === "number" ? count(tokens) : tokens} tokens`,
    stats.thinking_s === undefined ? null : seconds(stats.thinking_s)].filter(Boolean);
  return parts.length ? `Thought for ${parts.join(", ")}` : "Thoughts";
}

function statsLine(message) {
  const stats = message.stats ?? {};
  const parts = [];
  if (stats.completion_tokens !== undefined) parts.push(`${count(stats.completion_tokens)} tokens`);
  if (stats.tokens_per_s) parts.push(`${stats.tokens_per_s.toFixed(1)} tokens/s`);
  if (stats.ttft_s !== undefined) parts.push(`first token ${seconds(stats.ttft_s)}`);
  if (message.finish_reason) parts.push(`finish: ${message.finish_reason}`);
  else if (message.stopped) parts.push("stopped");
  return parts.join(" · ");
}

function noteFor(message) {
  if (message.error) return { text: `Error: ${message.error}`, kind: "error" };
  if (message.finish_reason === "length" && !message.content) {
    return { text: "The thinking was cut short: the token limit ran out before an answer. Raise Max tokens, or set "
      + "a thinking budget, in Settings, then Regenerate.", kind: "warning" };
  }
  if (message.finish_reason === "length") return { text: "The answer was cut off at the token limit.", kind: "warning" };
  if (message.finish_reason === "max_rounds") {
    return { text: "Stopped at the limit of tool rounds: the model still wanted to call tools.", kind: "warning" };
  }
  if (message.stopped) return { text: "Stopped.", kind: "info" };
  return null;
}

export function userView(message, { onEdit }) {
  const element = clone("user-message");
  const bubble = element.querySelector(".bubble");
  bubble.textContent = message.content;
  element.querySelector(".edit").addEventListener("click", () => onEdit(message, element));
  return { element, update() { bubble.textContent = message.content; } };
}

export function assistantView(message, { onRegenerate, onDecide }) {
  const element = clone("assistant-message");
  const details = element.querySelector(".thinking");
  const summary = details.querySelector("summary");
  const thinking = element.querySelector(".thinking-text");
  const answer = element.querySelector(".answer");
  const tools = element.querySelector(".tools");
  const note = element.querySelector(".note");
  const stats = element.querySelector(".stats");
  const actions = element.querySelector(".actions");
  actions.prepend(copyButton(() => message.content));
  actions.querySelector(".regenerate").addEventListener("click", () => onRegenerate(message));
  let renderedAnswer = null;
  let folded = Boolean(message.content);

  function update({ live = false } = {}) {
    element.classList.toggle("live", live);
    details.hidden = !message.reasoning;
    if (message.content && !folded) {
      folded = true;
      details.open = false;  // the answer began: fold the thinking away, once (it can be opened again)
    } else if (live && !message.content) {
      details.open = true;  // thinking live
    }
    summary.textContent = thinkingSummary(message, live);
    if (thinking.textContent !== message.reasoning) {
      thinking.textContent = message.reasoning ?? "";
      if (live) thinking.scrollTop = thinking.scrollHeight;
    }
    renderSteps(tools, message, onDecide);
    if (renderedAnswer !== message.content) {
      renderMarkdown(answer, message.content);
      renderedAnswer = message.content;
    }
    const shown = live ? null : noteFor(message);
    note.hidden = !shown;
    note.textContent = shown?.text ?? "";
    note.dataset.kind = shown?.kind ?? "";
    stats.textContent = live ? "" : statsLine(message);
  }

  update();
  return { element, update };
}
