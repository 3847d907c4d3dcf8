// Model output to HTML: Markdown (marked), math (KaTeX, as MathML), code (highlight.js), then DOMPurify.
// Model text is untrusted. Raw HTML in it is shown as text, never parsed; whatever marked, KaTeX and highlight.js
// make of it goes through DOMPurify, and only DOMPurify's Trusted Types policy may set innerHTML (the page's CSP
// enforces that), so nothing reaches the document without being sanitised.

const { Marked } = window.marked;
const { DOMPurify, hljs, katex } = window;

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const escapeHtml = (text) => text.replace(/[&<>"']/g, (c) => ESCAPES[c]);

const SANITIZE = {
  USE_PROFILES: { html: true, mathMl: true },
  // None of these come out of Markdown here; refusing them anyway means a slip above cannot load or submit anything.
  FORBID_TAGS: ["style", "img", "picture", "source", "video", "audio", "track", "form", "input", "button", "select",
    "textarea", "iframe", "object", "embed", "link", "meta", "base"],
  FORBID_ATTR: ["style", "id", "name", "srcset"],
  // KaTeX wraps its MathML in <semantics> with the TeX source in an <annotation>; DOMPurify refuses both (an
  // mXSS risk). Dropping the annotation with its text, and unwrapping <semantics>, leaves the visible formula.
  ADD_FORBID_CONTENTS: ["annotation"],
  RETURN_TRUSTED_TYPE: true,
};

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");  // never replace the chat page
    node.setAttribute("rel", "noopener noreferrer");
  }
});

// Math delimiters the model uses: $$…$$ and \[…\] (display), \(…\) and $…$ (inline). A $…$ pair must hug its
// content and not be followed by a digit, so prices ("$5 and $10") stay text.
const INLINE_MATH = [
  [/^\$\$([\s\S]+?)\$\$/, true],
  [/^\\\[([\s\S]+?)\\\]/, true],
  [/^\\\(([\s\S]+?)\\\)/, false],
  [/^\$(?=\S)((?:\\.|[^\\$\n])+?)(?<=\S)\$(?!\d)/, false],
];
const BLOCK_MATH = /^ {0,3}(?:\$\$([\s\S]+?)\$\$|\\\[([\s\S]+?)\\\])[ \t]*(?:\n+|$)/;

function renderMath(tex, displayMode) {
  // MathML needs neither KaTeX's stylesheet nor its fonts, and carries no inline styles (which the CSP refuses).
  return katex.renderToString(tex, { displayMode, output: "mathml", throwOnError: false, strict: "ignore" });
}

const markdown = new Marked({
  gfm: true,
  extensions: [
    {
      name: "blockMath", level: "block",
      start: (src) => src.match(/^ {0,3}(?:\$\$|\\\[)/m)?.index,
      tokenizer(src) {
        const match = BLOCK_MATH.exec(src);
        if (match) return { type: "blockMath", raw: match[0], text: (match[1] ?? match[2]).trim() };
      },
      renderer: (token) => `<div class="math-display">${renderMath(token.text, true)}</div>\n`,
    },
    {
      name: "inlineMath", level: "inline",
      start: (src) => src.match(/(?<!\\)\$|\\\(|\\\[/)?.index,
      tokenizer(src) {
        for (const [pattern, display] of INLINE_MATH) {
          const match = pattern.exec(src);
          if (match) return { type: "inlineMath", raw: match[0], text: match[1].trim(), display };
        }
      },
      renderer: (token) => renderMath(token.text, token.display),
    },
  ],
  renderer: {
    html: ({ text }) => escapeHtml(text),
    code({ text, lang }) {
      const language = (lang ?? "").split(/\s/)[0];
      const known = language && hljs.getLanguage(language);
      const body = known ? hljs.highlight(text, { language, ignoreIllegals: true }).value : escapeHtml(text);
      const label = language ? ` language-${escapeHtml(language)}` : "";
      return `<pre><code class="hljs${label}">${body}</code></pre>\n`;
    },
    image: ({ href, text }) => `<a href="${escapeHtml(href)}">${escapeHtml(text || href)}</a>`,
    checkbox: ({ checked }) => (checked ? "☑ " : "☐ "),
  },
});

/** Render Markdown `text` into `element`, with a copy button on each code block. */
export function renderMarkdown(element, text) {
  element.innerHTML = DOMPurify.sanitize(markdown.parse(text), SANITIZE);
  for (const pre of element.querySelectorAll("pre")) {
    pre.append(copyButton(() => pre.querySelector("code")?.textContent ?? ""));
  }
}

export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  // Plain http on a LAN address is not a secure context: copy through a selected, off-screen textarea.
  const area = document.createElement("textarea");
  area.value = text;
  area.className = "offscreen";
  document.body.append(area);
  area.select();
  document.execCommand("copy");
  area.remove();
}

/** A "Copy" button that copies `getText()` and says so for a moment. */
export function copyButton(getText, label = "Copy") {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy";
  button.textContent = label;
  button.addEventListener("click", async () => {
    await copyText(getText());
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = label; }, 1500);
  });
  return button;
}
