// Copies the vendored front-end files from node_modules into ../assets/vendor/.
// Run with `npm ci && npm run vendor`; the copies are committed so the Rust build needs no npm.
import { copyFileSync, mkdirSync, statSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const dest = join(here, "..", "assets", "vendor");
const files = [
  ["node_modules/uplot/dist/uPlot.iife.min.js", "uPlot.iife.min.js"],
  ["node_modules/uplot/dist/uPlot.min.css", "uPlot.min.css"],
  ["node_modules/uplot/LICENSE", "uPlot.LICENSE"],
];

mkdirSync(dest, { recursive: true });
for (const [from, to] of files) {
  const src = join(here, from);
  const out = join(dest, to);
  copyFileSync(src, out);
  console.log(`vendored ${from} -> assets/vendor/${to} (${statSync(out).size} bytes)`);
}
