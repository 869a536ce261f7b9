'use strict'
// Load generator for bench/connections.js, in its own process (pinned to its own core by the
// parent): `node bench/connection-load.js '<json>'` with
//   { port, timingPort, servername, kind: 'full' | 'resumed' | 'keepalive', seconds, warmup, concurrency, serverPid, clockTicks, cert, key, ca }
// servername: the SNI name every connection sends, or null for none (a connection by IP)
// full       a new TLS 1.3 connection per request: full handshake with a client certificate,
//            one GET /, Connection: close
// resumed    the same, resuming the TLS 1.3 session the previous connection of the loop received
// keepalive  `concurrency` persistent connections, one request at a time each
// After `warmup` seconds it reads the server's CPU time from /proc/<serverPid>/stat and its request
// timing (bench/server.js), counts the operations completed in the next `seconds`, reads both
// again, and prints one JSON line:
//   { ops, failed, notResumed, seconds, cpuMicros, userMicros, requestMicros, requests, p50, p99 }
// (p50/p99 in ms, connections only; requestMicros: time in the server's request listener)
const fs = require('node:fs')
const http = require('node:http')
const tls = require('node:tls')
const { processCpuMicros, responseFramer } = require('./common')

const config = JSON.parse(process.argv[2])
const REQUEST = Buffer.from('GET / HTTP/1.1\r\nHost: api\r\n\r\n')
const CLOSE_REQUEST = Buffer.from('GET / HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n')
// One client context for every connection: the client's own PEM parsing is not what we measure.
const secureContext = tls.createSecureContext({
  cert: fs.readFileSync(config.cert),
  key: fs.readFileSync(config.key),
  ca: fs.readFileSync(config.ca),
  minVersion: 'TLSv1.3'
})
const connectOptions = {
  host: '127.0.0.1',
  port: config.port,
  secureContext,
  minVersion: 'TLSv1.3',
  checkServerIdentity: () => undefined,
  ...(config.servername == null ? {} : { servername: config.servername })
}

const state = { measuring: false, stopped: false, ops: 0, failed: 0, notResumed: 0, latencies: [] }

function record (ok, started, resumed) {
  if (!state.measuring) return
  if (!ok) {
    state.failed++
    return
  }
  state.ops++
  if (started !== null) state.latencies.push(performance.now() - started)
  if (resumed === false) state.notResumed++
}

/** One connection, one request, closed by the server; resolves with the session to resume next. */
function connectOnce (session) {
  return new Promise((resolve) => {
    const started = performance.now()
    const socket = tls.connect({ ...connectOptions, session })
    let next = session
    let head = ''
    socket.on('session', (s) => { next = s })
    socket.on('secureConnect', () => socket.write(CLOSE_REQUEST))
    socket.on('data', (chunk) => { if (head.length < 12) head += chunk.toString('latin1') })
    socket.on('error', () => {})
    socket.on('close', () => {
      const ok = head.startsWith('HTTP/1.1 200')
      record(ok, started, config.kind === 'resumed' ? socket.isSessionReused() : null)
      resolve(next)
    })
  })
}

async function connectionLoop () {
  let session
  while (!state.stopped) {
    const next = await connectOnce(session)
    if (config.kind === 'resumed') session = next
  }
}

/** A persistent connection sending the next request when the previous response is complete. */
function keepAliveLoop () {
  return new Promise((resolve) => {
    const socket = tls.connect(connectOptions)
    socket.on('secureConnect', () => socket.write(REQUEST))
    socket.on('data', responseFramer((response) => {
      record(response.startsWith('HTTP/1.1 200'), null, null)
      if (state.stopped) socket.end()
      else socket.write(REQUEST)
    }))
    socket.on('error', () => record(false, null, null))
    socket.on('close', resolve)
  })
}

/** The server's request timing so far: `{ micros, requests }`. */
function serverTiming () {
  return new Promise((resolve, reject) => {
    http.get({ host: '127.0.0.1', port: config.timingPort, agent: false }, (res) => {
      let body = ''
      res.on('data', (chunk) => { body += chunk })
      res.on('end', () => resolve(JSON.parse(body)))
    }).on('error', reject)
  })
}

function percentile (sorted, p) {
  if (sorted.length === 0) return NaN
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))]
}

async function main () {
  const loop = config.kind === 'keepalive' ? keepAliveLoop : connectionLoop
  const loops = Array.from({ length: config.concurrency }, () => loop())
  await new Promise((resolve) => setTimeout(resolve, config.warmup * 1000))
  const timingBefore = await serverTiming()
  const cpuBefore = processCpuMicros(config.serverPid, config.clockTicks)
  const started = performance.now()
  state.measuring = true
  await new Promise((resolve) => setTimeout(resolve, config.seconds * 1000))
  state.measuring = false
  const cpuAfter = processCpuMicros(config.serverPid, config.clockTicks)
  const timingAfter = await serverTiming()
  const seconds = (performance.now() - started) / 1000
  state.stopped = true
  await Promise.all(loops)
  const sorted = state.latencies.sort((a, b) => a - b)
  process.stdout.write(JSON.stringify({
    ops: state.ops,
    failed: state.failed,
    notResumed: state.notResumed,
    seconds,
    cpuMicros: cpuAfter.total - cpuBefore.total,
    userMicros: cpuAfter.user - cpuBefore.user,
    requestMicros: timingAfter.micros - timingBefore.micros,
    requests: timingAfter.requests - timingBefore.requests,
    p50: percentile(sorted, 0.5),
    p99: percentile(sorted, 0.99)
  }) + '\n')
}

main()
