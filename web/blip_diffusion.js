// Shows on the BLIP-Diffusion Save Subject node the file it wrote: the node's "text" output, which ComfyUI's front
// end has no generic display for (its own Preview Any node shows text the same way, through an extension).
import { app } from "../../scripts/app.js";

const WIDGET = "saved";
const CHAR_WIDTH = 7.5; // px per character of the widget font, to widen the node to its text

app.registerExtension({
  name: "BlipDiffusion.SaveSubject",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "BlipDiffusionSaveSubject") return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text?.[0];
      if (typeof text !== "string") return;
      let widget = this.widgets?.find((w) => w.name === WIDGET);
      if (!widget) {
        // not an input: neither in the saved workflow nor in the prompt. Read-only by ignoring clicks: a disabled
        // widget would hide its value.
        widget = this.addWidget("text", WIDGET, "", () => {}, { serialize: false });
        widget.serialize = false;
        widget.onClick = () => {};
      }
      widget.value = text;
      const [width, height] = this.computeSize();
      this.setSize([Math.max(this.size[0], width, CHAR_WIDTH * (WIDGET.length + text.length) + 60), Math.max(this.size[1], height)]);
      this.setDirtyCanvas(true, true);
    };
  },
});
