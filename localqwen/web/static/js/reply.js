// One streamed reply, gathered into an assistant message: its thinking, answer, finish reason and numbers.

import { streamChat } from "./api.js";

const round = (x) => Math.round(x * 1000) / 1000;

// `serve --reasoning-format none` sends no reasoning_content: the thinking opens the answer's text instead, as
// "<think>\n" + thinking + "\n</think>\n\n" + answer. Such text is split here, as the server would have.
const OPEN = "<think>\n";
const CLOSE = "\n</think>\n\n";

/** {reasoning, content} of text that starts with OPEN; an end that may be the start of CLOSE is held back. */
function splitThinking(raw) {
  const end = raw.indexOf(CLOSE, OPEN.length);
  if (end >= 0) return { reasoning: raw.slice(OPEN.length, end), content: raw.slice(end + CLOSE.length) };
  const reasoning = raw.slice(OPEN.length);
  for (let n = Math.min(CLOSE.length - 1, reasoning.length); n > 0; n -= 1) {
    if (CLOSE.startsWith(reasoning.slice(-n))) return { reasoning: reasoning.slice(0, -n), content: "" };
  }
  return { reasoning, content: "" };
}

/**
 * Stream the completion of `body` into `message` (reasoning, content, finish_reason, stats), calling
 * onChunk(chunkId) after each chunk. Throws what streamChat throws; message.stats is set however it ends.
 *
 * stats: ttft_s (request to first token), thinking_s (first thinking to first answer token), thinking_deltas (thinking
 * chunks seen: about the thinking tokens, for a reply stopped before the server's count came), and from the final
 * usage chunk prompt_tokens, completion_tokens, thinking_tokens (the server's count) and tokens_per_s.
 */
export async function streamInto(message, body, signal, onChunk) {
  const started = performance.now();
  let first = null;
  let answerAt = null;
  let thinkingDeltas = 0;
  let usage = null;
  let raw = "";  // the content text as sent
  let thinkingInContent = null;  // whether it opens with the thinking: unknown while it could still be OPEN
  const measure = (end) => {
    const stats = {};
    if (first !== null) stats.ttft_s = round((first - started) / 1000);
    if (message.reasoning) {
      stats.thinking_deltas = thinkingDeltas;
      stats.thinking_s = round(((answerAt ?? end) - first) / 1000);
    }
    if (usage) {
      stats.prompt_tokens = usage.prompt_tokens;
      stats.completion_tokens = usage.completion_tokens;
      stats.thinking_tokens = usage.completion_tokens_details?.reasoning_tokens ?? 0;
      if (usage.completion_tokens > 1 && end > first) {
        stats.tokens_per_s = round((usage.completion_tokens - 1) / ((end - first) / 1000));
      }
    }
    stats.total_s = round((end - started) / 1000);
    return stats;
  };

  try {
    await streamChat(body, signal, (chunk) => {
      if (chunk.usage) usage = chunk.usage;
      const now = performance.now();
      for (const { delta, finish_reason: finish } of chunk.choices ?? []) {
        if (delta?.reasoning_content) {
          first ??= now;
          thinkingDeltas += 1;
          thinkingInContent = false;
          message.reasoning += delta.reasoning_content;
        }
        if (delta?.content) {
          first ??= now;
          raw += delta.content;
          if (thinkingInContent === null && !OPEN.startsWith(raw)) thinkingInContent = raw.startsWith(OPEN);
          if (thinkingInContent) {
            ({ reasoning: message.reasoning, content: message.content } = splitThinking(raw));
            if (!message.content) thinkingDeltas += 1;
          } else if (thinkingInContent === false) {
            message.content = raw;
          }
          if (message.content) answerAt ??= now;
        }
        if (finish) message.finish_reason = finish;
      }
      message.stats = measure(now);
      onChunk(chunk.id);
    });
  } finally {
    // Ended while the text could still have been OPEN, or inside the thinking (cut short): show all of it.
    if (thinkingInContent === null) message.content = raw;
    else if (thinkingInContent && !raw.includes(CLOSE, OPEN.length)) message.reasoning = raw.slice(OPEN.length);
    message.stats = measure(performance.now());
  }
}
