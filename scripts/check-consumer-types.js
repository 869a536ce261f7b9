'use strict'
// Checks the built package the way consumers see it (run by `npm test` after the build):
// - test/types/ compiles under each module resolution a TypeScript consumer may use: node16 and
//   nodenext (ES module and CommonJS consumers) and bundler, resolving the package by its own
//   name through `exports`, as an installed copy would, with skipLibCheck off (the package's own
//   declarations are checked as a strict consumer's compiler checks them);
// - `import` of each entry point gives the plugin (default) and the named exports at run time;
// - `npm pack` ships every file `exports` names, the `.d.mts` declarations included, and the
//   docs the README links to.
const { execFileSync } = require('node:child_process')
const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')

const root = path.join(__dirname, '..')
const run = (cmd, args) => execFileSync(cmd, args, { cwd: root, encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] })
const tsc = path.join(path.dirname(require.resolve('typescript/package.json')), 'bin', 'tsc')

for (const mode of ['node16', 'nodenext', 'bundler']) {
  run(process.execPath, [tsc, '-p', path.join('test', 'types', `tsconfig.${mode}.json`)])
  console.log(`types: moduleResolution ${mode} ok`)
}

// The classic `node` resolution (the default beside `module: commonjs`) ignores `exports` and cannot
// name a package by itself: it gets an installed-looking copy (symlinks) and finds the dev agent's
// types through `typesVersions`.
const installed = fs.mkdtempSync(path.join(os.tmpdir(), 'fcn-node10-'))
try {
  fs.mkdirSync(path.join(installed, 'node_modules'))
  fs.symlinkSync(root, path.join(installed, 'node_modules', 'fastify-consul-native'), 'dir')
  for (const dep of ['fastify', '@types']) fs.symlinkSync(path.join(root, 'node_modules', dep), path.join(installed, 'node_modules', dep), 'dir')
  fs.copyFileSync(path.join(root, 'test', 'types', 'cjs.cts'), path.join(installed, 'consumer.ts'))
  run(process.execPath, [tsc, '--noEmit', '--strict', '--skipLibCheck', 'false', '--esModuleInterop', '--target', 'ES2022', '--module', 'commonjs',
    '--moduleResolution', 'node10', '--types', 'node', path.join(installed, 'consumer.ts')])
  console.log('types: moduleResolution node10 ok')
} finally {
  fs.rmSync(installed, { recursive: true, force: true })
}

const esm = [
  "import consulNative, { consulNative as named, httpsOptions } from 'fastify-consul-native'",
  "import devAgent, { startDevAgent } from 'fastify-consul-native/dev-agent'",
  "if (consulNative !== named || typeof httpsOptions !== 'function') throw new Error('default import is not the plugin')",
  "if (devAgent.startDevAgent !== startDevAgent) throw new Error('dev-agent default import')"
].join('\n')
run(process.execPath, ['--input-type=module', '-e', esm])
console.log('esm: import ok')

const packed = JSON.parse(run('npm', ['pack', '--dry-run', '--json', '--ignore-scripts']))[0].files.map((f) => f.path)
const targets = []
const collect = (value) => {
  if (typeof value === 'string') targets.push(value.replace(/^\.\//, ''))
  else for (const v of Object.values(value)) collect(v)
}
collect(require(path.join(root, 'package.json')).exports)
const missing = targets.filter((file) => !packed.includes(file))
if (missing.length > 0) throw new Error(`npm pack leaves out files that exports names: ${missing.join(', ')}`)
// The README links to docs/semantics.md, and the source maps carry their sources: an installed copy reads both.
for (const file of ['dist/esm/index.d.mts', 'dist/esm/dev-agent.d.mts', 'docs/semantics.md']) {
  if (!packed.includes(file)) throw new Error(`npm pack leaves out ${file}`)
}
console.log(`pack: ${targets.length} export targets shipped`)
