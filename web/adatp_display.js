// Pure helpers of the AdaTP web extension: no ComfyUI imports, so node's own
// test runner can test them (web/tests/*.test.mjs).

export const ADATP_PREFIX = "AdaTP_";
export const DISPLAY_WIDGET = "adatp_display";
// Nodes whose returned text the stock frontend would not show.
export const TEXT_NODES = Object.freeze(["AdaTP_GenerateAnswer", "AdaTP_PruneTokens", "AdaTP_CaptionFolder", "AdaTP_SelfCheck", "AdaTP_ClipDataset"]);
// Nodes whose text is a table: shown in a fixed-width font, without wrapping, so columns line up.
export const TABLE_NODES = Object.freeze(["AdaTP_SelfCheck"]);
// A recognisable deep teal for every AdaTP node (title bar, body).
export const NODE_COLORS = Object.freeze({ color: "#1f4a52", bgcolor: "#16353b" });

export function isAdatpNode(type) {
  return typeof type === "string" && type.startsWith(ADATP_PREFIX);
}

function asLines(text) {
  if (text === undefined || text === null) return [];
  const items = Array.isArray(text) ? text : [text];
  return items.map((t) => (typeof t === "string" ? t : JSON.stringify(t)));
}

// The text shown under a node after it ran. `text` is message.text from the
// node's {"ui": {"text": [...]}}: [answer, stats] for Generate Answer, [stats]
// for Prune Tokens, [summary] for Caption Folder, [report] for Self Check.
export function displayText(nodeType, text) {
  const items = asLines(text);
  if (nodeType === "AdaTP_GenerateAnswer" && items.length >= 2) {
    const answer = items[0].trim() === "" ? "(empty answer)" : items[0];
    return `${answer}\n\n${items.slice(1).join("\n")}`;
  }
  return items.join("\n");
}

// Rows the read-only text box needs, clamped so a long caption scrolls.
export function displayRows(text, columns = 48, minRows = 3, maxRows = 24) {
  const rows = String(text)
    .split("\n")
    .reduce((n, line) => n + Math.max(1, Math.ceil(line.length / columns)), 0);
  return Math.min(maxRows, Math.max(minRows, rows));
}

// Node size that fits the text box: at least `minWidth` wide, and tall enough
// for the node's own widgets (`computed`) plus `rows` lines of text.
export function displaySize(current, computed, rows, lineHeight = 15, minWidth = 420) {
  const width = Math.max(current[0], computed[0], minWidth);
  const height = Math.max(current[1], computed[1] + rows * lineHeight);
  return [width, height];
}

// Optional widgets appended to a node after workflows were saved with it: {name: value} of those
// whose spec names a "saved_default", the value a workflow saved before the widget existed gets
// (the node's behaviour from before), while a new node gets the spec's "default". nodeData is the
// node's /object_info entry.
export function savedDefaults(nodeData) {
  const optional = nodeData?.input?.optional ?? {};
  const out = {};
  for (const [name, spec] of Object.entries(optional)) {
    const opts = Array.isArray(spec) ? spec[1] : undefined;
    if (opts && typeof opts === "object" && "saved_default" in opts) out[name] = opts.saved_default;
  }
  return out;
}

// The widget values to set on a node being loaded from a saved workflow: ComfyUI restores widgets
// by position from `widgetsValues` and leaves the ones past its end at their defaults, so each
// widget of `defaults` (savedDefaults) whose position `widgetNames` gives lies past the saved values
// takes its saved_default instead. Returns {name: value}.
export function legacyWidgetValues(widgetNames, widgetsValues, defaults) {
  if (!Array.isArray(widgetsValues)) return {};
  const out = {};
  for (const [name, value] of Object.entries(defaults)) {
    const index = widgetNames.indexOf(name);
    if (index >= widgetsValues.length) out[name] = value;
  }
  return out;
}
