'use strict'
// Writes the ESM entry points next to the CommonJS build, so `import` users get the same
// module instance (and the same named exports) as `require` users, and their declarations
// (`.d.mts`): the CommonJS `.d.ts` describes `module.exports`, which is not what `import x from`
// gives under `moduleResolution: node16`/`nodenext`/`bundler` (the default export is the plugin).
const fs = require('node:fs')
const path = require('node:path')

const dist = path.join(__dirname, '..', 'dist')
const entries = { index: '../index.js', 'dev-agent': '../dev-agent/index.js' }

fs.mkdirSync(path.join(dist, 'esm'), { recursive: true })
for (const [name, target] of Object.entries(entries)) {
  const targetPath = path.join(dist, 'esm', target)
  if (!fs.existsSync(targetPath)) continue
  const cjs = require(targetPath)
  const names = Object.keys(cjs).filter((key) => key !== 'default' && key !== '__esModule')
  const lines = [
    `import cjs from '${target}'`,
    'export default cjs.default ?? cjs',
    ...names.map((key) => `export const ${key} = cjs.${key}`)
  ]
  fs.writeFileSync(path.join(dist, 'esm', `${name}.mjs`), lines.join('\n') + '\n')
  // Named exports (types included) pass through. The default is named by the export it equals:
  // a named import means the same under node16 and bundler resolution, a default import of a
  // CommonJS module does not.
  const defaultName = 'default' in cjs ? names.find((key) => cjs[key] === cjs.default) : undefined
  if ('default' in cjs && defaultName === undefined) throw new Error(`${target}: the default export must also be a named one`)
  const types = defaultName === undefined
    ? [`import * as cjs from '${target}'`, `export * from '${target}'`, 'export default cjs']
    : [`export * from '${target}'`, `export { ${defaultName} as default } from '${target}'`]
  fs.writeFileSync(path.join(dist, 'esm', `${name}.d.mts`), types.join('\n') + '\n')
}
