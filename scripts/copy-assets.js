'use strict'
// Copies the non-TypeScript files the compiled code loads at run time (the gRPC .proto) from lib/
// to the same place under dist/, so that the published package carries them.
const fs = require('node:fs')
const path = require('node:path')

const lib = path.join(__dirname, '..', 'lib')
const dist = path.join(__dirname, '..', 'dist')
const ASSETS = ['.proto']

function copy (dir) {
  for (const entry of fs.readdirSync(path.join(lib, dir), { withFileTypes: true })) {
    const relative = path.join(dir, entry.name)
    if (entry.isDirectory()) copy(relative)
    else if (ASSETS.includes(path.extname(entry.name))) {
      fs.mkdirSync(path.join(dist, dir), { recursive: true })
      fs.copyFileSync(path.join(lib, relative), path.join(dist, relative))
    }
  }
}

copy('.')
