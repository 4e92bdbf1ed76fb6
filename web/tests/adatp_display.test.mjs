import assert from "node:assert/strict";
import { test } from "node:test";

import {
  NODE_COLORS,
  TABLE_NODES,
  TEXT_NODES,
  displayRows,
  displaySize,
  displayText,
  isAdatpNode,
  legacyWidgetValues,
  savedDefaults,
} from "../adatp_display.js";

test("AdaTP nodes are recognised by their type prefix", () => {
  assert.equal(isAdatpNode("AdaTP_GenerateAnswer"), true);
  assert.equal(isAdatpNode("PreviewImage"), false);
  assert.equal(isAdatpNode(undefined), false);
  assert.match(NODE_COLORS.color, /^#[0-9a-f]{6}$/);
});

test("Generate Answer shows the answer, a blank line, then the stats", () => {
  const text = displayText("AdaTP_GenerateAnswer", ["A red square moves.", "Tokens kept: 1568 of 6272"]);
  assert.equal(text, "A red square moves.\n\nTokens kept: 1568 of 6272");
});

test("an empty answer is said to be empty, not shown as nothing", () => {
  assert.match(displayText("AdaTP_GenerateAnswer", ["  ", "stats"]), /^\(empty answer\)\n\nstats$/);
});

test("Prune Tokens shows its stats; odd payloads never throw", () => {
  assert.equal(displayText("AdaTP_PruneTokens", ["Tokens kept: 1\nFLOPs: 2"]), "Tokens kept: 1\nFLOPs: 2");
  assert.equal(displayText("AdaTP_PruneTokens", undefined), "");
  assert.equal(displayText("AdaTP_PruneTokens", "single"), "single");
  assert.equal(displayText("AdaTP_PruneTokens", [{ a: 1 }]), '{"a":1}');
  assert.deepEqual(TEXT_NODES, ["AdaTP_GenerateAnswer", "AdaTP_PruneTokens", "AdaTP_CaptionFolder", "AdaTP_SelfCheck",
    "AdaTP_ClipDataset"]);
});

test("Clip Dataset shows its summary as it came", () => {
  const summary = "Sources: 1 (0 failed)\nClips: 3 planned, 3 cut now";
  assert.equal(displayText("AdaTP_ClipDataset", [summary]), summary);
});

test("Self Check shows its report as it came, as a table", () => {
  const report = "torch  2.13\n\nfamily  check  result\nLLaVA-OV  figures  pass";
  assert.equal(displayText("AdaTP_SelfCheck", [report]), report);
  assert.deepEqual(TABLE_NODES, ["AdaTP_SelfCheck"]);
  assert.ok(TABLE_NODES.every((n) => TEXT_NODES.includes(n)));
});

test("the text box grows with the text and is clamped", () => {
  assert.equal(displayRows("one line"), 3);
  assert.equal(displayRows("a\nb\nc\nd\ne"), 5);
  assert.equal(displayRows("x".repeat(48 * 10)), 10);
  assert.equal(displayRows("x\n".repeat(100)), 24);
});

test("the node grows to fit the text but never shrinks", () => {
  assert.deepEqual(displaySize([300, 200], [320, 180], 10), [420, 330]);
  assert.deepEqual(displaySize([900, 800], [320, 180], 3), [900, 800]);
});

test("a workflow saved before an appended widget gets its saved_default; a newer one keeps its value", () => {
  const nodeData = { input: { required: { seed: ["INT", { default: 0 }] }, optional: {
    top_k: ["INT", { default: -1 }],
    settings: [["model", "widgets"], { default: "model", saved_default: "widgets" }],
  } } };
  const defaults = savedDefaults(nodeData);
  assert.deepEqual(defaults, { settings: "widgets" });
  const names = ["max_new_tokens", "seed", "control_after_generate", "top_k", "settings"];
  assert.deepEqual(legacyWidgetValues(names, [64, 0, "fixed", -1], defaults), { settings: "widgets" });
  assert.deepEqual(legacyWidgetValues(names, [64, 0, "fixed", -1, "model"], defaults), {});
  assert.deepEqual(legacyWidgetValues(names, undefined, defaults), {});
  assert.deepEqual(savedDefaults({}), {});
});
