// The AdaTP ComfyUI extension: shows the answer and stats that Generate Answer
// and Prune Tokens return, and Self Check's table (the stock frontend shows no text
// outputs), and gives AdaTP nodes a recognisable colour. The logic lives in adatp_display.js.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";
import {
  DISPLAY_WIDGET,
  NODE_COLORS,
  TABLE_NODES,
  TEXT_NODES,
  displayRows,
  displaySize,
  displayText,
  isAdatpNode,
  legacyWidgetValues,
  savedDefaults,
} from "./adatp_display.js";

function showText(node, text) {
  let widget = node.widgets?.find((w) => w.name === DISPLAY_WIDGET);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, DISPLAY_WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.serialize = false; // never saved: widget values stay positional
    if (widget.inputEl) {
      widget.inputEl.readOnly = true;
      widget.inputEl.style.opacity = "0.9";
      if (TABLE_NODES.includes(node.comfyClass)) {
        widget.inputEl.style.fontFamily = "monospace";
        widget.inputEl.style.whiteSpace = "pre";
        widget.inputEl.wrap = "off";
      }
    }
  }
  widget.value = text;
  const rows = displayRows(text);
  if (widget.inputEl) widget.inputEl.rows = rows;
  requestAnimationFrame(() => {
    node.setSize(displaySize(node.size, node.computeSize(), rows));
    app.graph.setDirtyCanvas(true, false);
  });
}

app.registerExtension({
  name: "AdaTP.Display",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const defaults = savedDefaults(nodeData);
    if (Object.keys(defaults).length) {
      // A workflow saved before an optional widget was appended keeps its old behaviour (README, Workflows).
      // Set in onConfigure (where the saved values are known) and again once the whole graph is
      // configured, whichever order a frontend release restores widget values in.
      const apply = (node) => {
        for (const [name, value] of Object.entries(node.adatpSavedBefore ?? {})) {
          const widget = node.widgets?.find((w) => w.name === name);
          if (widget) widget.value = value;
        }
      };
      const onConfigure = nodeType.prototype.onConfigure;
      nodeType.prototype.onConfigure = function (info) {
        const names = (this.widgets ?? []).map((w) => w.name);
        this.adatpSavedBefore = legacyWidgetValues(names, info?.widgets_values, defaults);
        apply(this);
        return onConfigure?.apply(this, arguments);
      };
      const onAfterGraphConfigured = nodeType.prototype.onAfterGraphConfigured;
      nodeType.prototype.onAfterGraphConfigured = function () {
        apply(this);
        delete this.adatpSavedBefore;
        return onAfterGraphConfigured?.apply(this, arguments);
      };
    }
    if (!TEXT_NODES.includes(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      showText(this, displayText(nodeData.name, message?.text));
    };
  },
  nodeCreated(node) {
    if (!isAdatpNode(node.comfyClass)) return;
    node.color = node.color ?? NODE_COLORS.color;
    node.bgcolor = node.bgcolor ?? NODE_COLORS.bgcolor;
  },
});
