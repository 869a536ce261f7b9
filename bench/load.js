'use strict'
// Load generator, in its own process: `node bench/load.js <port> <keepalive|handshake> <seconds> <certFile> <keyFile> <caFile>`.
// keepalive: 16 persistent connections (undici Pool); handshake: a new TLS connection (full
// handshake, no resumption) for every request, 8 at a time. Prints requests/s as JSON.
const fs = require('node:fs')
const tls = require('node:tls')
const { Pool } = require('undici')

const [port, kind, seconds, certFile, keyFile, caFile] = process.argv.slice(2)
const creds = { cert: fs.readFileSync(certFile), key: fs.readFileSync(keyFile), ca: fs.readFileSync(caFile), checkServerIdentity: () => undefined }
const until = Date.now() + Number(seconds) * 1000
let done = 0
let failed = 0

async function keepAliveLoop (pool) {
  while (Date.now() < until) {
    const res = await pool.request({ path: '/', method: 'GET' })
    await res.body.dump()
    if (res.statusCode === 200) done++
    else failed++
  }
}

function oneHandshakeRequest () {
  return new Promise((resolve) => {
    const socket = tls.connect({ host: '127.0.0.1', port: Number(port), ...creds, session: undefined })
    let data = ''
    socket.on('secureConnect', () => socket.write('GET / HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n'))
    socket.on('data', (chunk) => { data += chunk })
    socket.on('error', () => { failed++; resolve() })
    socket.on('close', () => {
      if (data.startsWith('HTTP/1.1 200')) done++
      else if (data.length > 0) failed++
      resolve()
    })
  })
}

async function handshakeLoop () {
  while (Date.now() < until) await oneHandshakeRequest()
}

async function main () {
  const started = Date.now()
  if (kind === 'keepalive') {
    const pool = new Pool(`https://127.0.0.1:${port}`, { connections: 16, connect: creds })
    await Promise.all(Array.from({ length: 16 }, () => keepAliveLoop(pool)))
    await pool.close()
  } else {
    await Promise.all(Array.from({ length: 8 }, () => handshakeLoop()))
  }
  const elapsed = (Date.now() - started) / 1000
  process.stdout.write(JSON.stringify({ rps: done / elapsed, failed }) + '\n')
}

main()
