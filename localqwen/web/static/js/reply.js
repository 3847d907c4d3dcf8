// One streamed reply, gathered into an assistant message: its thinking, answer, finish reason and numbers.

import { streamChat } from "./api.js";

const round = (x) => Math.round(x * 1000) / 1000;

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
          message.reasoning += delta.reasoning_content;
        }
        if (delta?.content) {
          first ??= now;
          answerAt ??= now;
          message.content += delta.content;
        }
        if (finish) message.finish_reason = finish;
      }
      message.stats = measure(now);
      onChunk(chunk.id);
    });
  } finally {
    message.stats = measure(performance.now());
  }
}
