'use strict'
// Writes the ESM entry points next to the CommonJS build, so `import` users get the same
// module instance (and the same named exports) as `require` users.
const fs = require('node:fs')
const path = require('node:path')

const dist = path.join(__dirname, '..', 'dist')
const entries = { 'index.mjs': '../index.js', 'dev-agent.mjs': '../dev-agent/index.js' }

fs.mkdirSync(path.join(dist, 'esm'), { recursive: true })
for (const [file, target] of Object.entries(entries)) {
  const targetPath = path.join(dist, 'esm', target)
  if (!fs.existsSync(targetPath)) continue
  const names = Object.keys(require(targetPath)).filter((name) => name !== 'default' && name !== '__esModule')
  const lines = [
    `import cjs from '${target}'`,
    'export default cjs.default ?? cjs',
    ...names.map((name) => `export const ${name} = cjs.${name}`)
  ]
  fs.writeFileSync(path.join(dist, 'esm', file), lines.join('\n') + '\n')
}
