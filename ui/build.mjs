// Builds vman's web console into dist/: one JavaScript and one CSS bundle
// (esbuild; xterm.js and its fit add-on included) with content hashes in
// their names, and index.html pointing at them. vman embeds dist/ at
// compile time (build.rs) and serves it at /ui: index.html revalidated on
// every load, the hashed assets cached for good.
import * as esbuild from 'esbuild';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';

const here = path.dirname(new URL(import.meta.url).pathname);
const dist = path.join(here, 'dist');

await rm(dist, { recursive: true, force: true });
await mkdir(path.join(dist, 'assets'), { recursive: true });

const result = await esbuild.build({
  entryPoints: [path.join(here, 'src/main.js')],
  bundle: true,
  minify: true,
  sourcemap: false,
  format: 'esm',
  target: ['chrome100', 'firefox100', 'safari15'],
  outdir: path.join(dist, 'assets'),
  entryNames: '[name]-[hash]',
  metafile: true,
  logLevel: 'warning',
});

let js = null;
let css = null;
for (const [out, meta] of Object.entries(result.metafile.outputs)) {
  if (!meta.entryPoint && !out.endsWith('.css')) continue;
  const name = path.basename(out);
  if (name.endsWith('.js')) js = name;
  if (name.endsWith('.css')) css = name;
}
if (!js || !css) {
  throw new Error(`esbuild gave no JS or CSS bundle: ${Object.keys(result.metafile.outputs)}`);
}

const page = (await readFile(path.join(here, 'src/index.html'), 'utf8'))
  .replace('%CSS%', `/ui/assets/${css}`)
  .replace('%JS%', `/ui/assets/${js}`);
await writeFile(path.join(dist, 'index.html'), page);
console.log(`ui: dist/index.html, dist/assets/${js}, dist/assets/${css}`);
