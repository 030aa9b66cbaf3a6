// Our node translations (locales/<lang>/nodeDefs.json) for frontends that lose them: frontend 1.32 merges custom
// node translations first and then replaces the whole locale when it lazily loads a non-English one, so our
// display names, descriptions and tooltips fall back to English. Writing the translated text into the node
// definitions themselves makes that fallback the right language. Newer frontends find the keys and never need it.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const PREFIX = "LoraTrainer_";

function currentLocale() {
  return app.extensionManager?.setting?.get?.("Comfy.Locale") ?? app.ui?.settings?.getSettingValue?.("Comfy.Locale");
}

function translateDef(def, tr) {
  if (tr.display_name) def.display_name = tr.display_name;
  if (tr.description) def.description = tr.description;
  for (const group of ["required", "optional"]) {
    for (const [name, spec] of Object.entries(def.input?.[group] ?? {})) {
      const tooltip = tr.inputs?.[name]?.tooltip;
      if (tooltip && Array.isArray(spec)) spec[1] = { ...(spec[1] ?? {}), tooltip };
    }
  }
  const tooltips = def.output_tooltips ?? [];
  for (const [index, out] of Object.entries(tr.outputs ?? {})) if (out.tooltip) tooltips[Number(index)] = out.tooltip;
  if (tooltips.length) def.output_tooltips = tooltips;
}

app.registerExtension({
  name: "lora_trainer.translations",
  async addCustomNodeDefs(defs) {
    const locale = currentLocale();
    if (!locale || locale === "en") return;
    let nodeDefs;
    try {
      nodeDefs = (await (await api.fetchApi("/i18n")).json())?.[locale]?.nodeDefs;
    } catch {
      return; // translations are a nicety; never break node registration over them
    }
    for (const [id, def] of Object.entries(defs)) {
      if (id.startsWith(PREFIX) && nodeDefs?.[id]) translateDef(def, nodeDefs[id]);
    }
  },
});
