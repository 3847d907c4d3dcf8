// The server's HTTP API as the page uses it: the API key, errors, and streamed chat completions.
// Paths are relative to the page, so the page also works behind a proxy that serves it under a sub-path.

const KEY_STORAGE = "localqwen.apiKey";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export const apiKey = {
  get: () => localStorage.getItem(KEY_STORAGE),
  set: (key) => localStorage.setItem(KEY_STORAGE, key),
};

export async function request(path, { method = "GET", body, signal } = {}) {
  const headers = {};
  const key = apiKey.get();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
  return response;
}

async function errorMessage(response) {
  try {
    const data = await response.json();
    return data?.error?.message ?? `${response.status} ${response.statusText}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

/** The model's name, context and defaults (GET /props), and whether the API needs a key. */
export const getProps = async () => (await request("props")).json();

/** Tokens of the prompt the chat template makes from `messages` and `tools` (generation prompt included). */
export async function countTokens(messages, tools) {
  const response = await request("tokenize", { method: "POST", body: { messages, tools } });
  return (await response.json()).count;
}

/** End the thinking of the running completion `id` (the id of its stream chunks). */
export const answerNow = (id) =>
  request(`v1/chat/completions/${encodeURIComponent(id)}/answer-now`, { method: "POST", body: {} });

/**
 * Stream a chat completion: onChunk(chunk) for each server-sent event, until [DONE].
 * Aborting `signal` closes the connection, which stops the generation on the server.
 */
export async function streamChat(body, signal, onChunk) {
  const response = await request("v1/chat/completions", {
    method: "POST", signal, body: { ...body, stream: true, stream_options: { include_usage: true } },
  });
  await readEvents(response, (chunk) => {
    if (chunk.error) throw new ApiError(500, chunk.error.message);
    onChunk(chunk);
  });
}

/** onData(data) for the JSON of each server-sent event of `response`, until the stream ends or sends [DONE]. */
export async function readEvents(response, onData) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart()).join("\n");
      if (data === "[DONE]") return;
      if (data) onData(JSON.parse(data));
    }
  }
}
