'use strict'
// One benchmark server, in its own process: `node bench/server.js <mode> <agentAddress>`.
//   static       Fastify with a fixed mTLS configuration (the leaf and roots read once), no plugin
//   static-again the same server under another name, so that a run measures two processes of it: the
//                control that shows how far identical servers differ on this machine in this run
//   static-sni   the same with an SNICallback that keeps the default context (what any dynamic
//                certificate setup pays per handshake, whoever implements it)
//   static-hook  static mTLS plus one empty onRequest hook: the floor of Fastify's hook machinery
//   static-hooks static mTLS plus an empty onRequest and an empty preParsing hook: the machinery
//                of the plugin's two hooks (its decision and its backstop), without their work
//   static-client static-hooks in a process that has used an HTTP client: 30 undici requests to
//                the agent, all answered before the server listens. Any use of an HTTP client
//                leaves Node's shared HTTP and stream code less optimized for the server's requests
//                (bench/instructions.js counts it); a real service has one, and so has the plugin
//   static-env   static-hooks, with the plugin running in the same process on a second app that
//                gets no traffic: what running the plugin's agent client, watches and TLS state
//                costs the served requests, without any of its per-request work
//   exempt       the plugin with the route exempt (dynamic TLS, no decision): "mTLS, no enforcement"
//   plugin       the same app with fastify-consul-native (dynamic TLS + enforcement)
//   exempt-worker, plugin-worker  the same two with `agent: { worker: true }`: the agent traffic on
//                a worker thread, so that the served requests run in an isolate without an HTTP client
// Prints its port and the port of its timing endpoint on stdout, then serves until SIGTERM, on which
// it closes and exits (so that `node --cpu-prof` writes its profile).
//
// Request timing: the server's request listener (Fastify's router, request construction, the
// onRequest and preParsing hooks, the handler's start: everything a hook adds runs in it) is timed
// with performance.now(), and a plain HTTP endpoint on 127.0.0.1 answers `{ micros, requests }` so
// far. The same instrument in every variant: differences between variants are the plugin's own work,
// without the kernel's and the load generator's noise that CPU time carries.
const http = require('node:http')
const https = require('node:https')
const Fastify = require('fastify')
const { consulNative, httpsOptions } = require('../dist/index.js')
const { agentApi } = require('./common')

const MODES = ['static', 'static-again', 'static-sni', 'static-hook', 'static-hooks', 'static-client', 'static-env', 'exempt', 'plugin', 'exempt-worker', 'plugin-worker']
const CLIENT_REQUESTS = 30

const timing = { micros: 0, requests: 0 }

// Fastify hands its request listener to https.createServer(options, listener).
const createServer = https.createServer
https.createServer = function timedCreateServer (...args) {
  const listener = args[args.length - 1]
  if (typeof listener === 'function') {
    args[args.length - 1] = function timedListener (req, res) {
      const started = performance.now()
      listener.call(this, req, res)
      timing.micros += (performance.now() - started) * 1000
      timing.requests++
    }
  }
  return createServer.apply(this, args)
}

function startTimingEndpoint () {
  const server = http.createServer((_req, res) => res.end(JSON.stringify(timing)))
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(server)))
}

async function main () {
  const [name, address] = process.argv.slice(2)
  if (!MODES.includes(name)) throw new Error(`unknown mode ${name}; one of ${MODES.join(', ')}`)
  const mode = name === 'static-again' ? 'static' : name
  let app
  if (mode.startsWith('static')) {
    const leaf = await agentApi({ address }, 'GET', '/v1/agent/connect/ca/leaf/api')
    const roots = await agentApi({ address }, 'GET', '/v1/agent/connect/ca/roots')
    const sni = mode === 'static-sni' ? { SNICallback: (_name, cb) => cb(null, undefined) } : {}
    app = Fastify({ https: { key: leaf.PrivateKeyPEM, cert: leaf.CertPEM, ca: roots.Roots.map((r) => r.RootCert), requestCert: true, rejectUnauthorized: true, ...sni } })
    if (mode !== 'static' && mode !== 'static-sni') app.addHook('onRequest', function emptyHook (_request, _reply, done) { done() })
    if (mode === 'static-hooks' || mode === 'static-client' || mode === 'static-env') app.addHook('preParsing', function emptyPreParsing (_request, _reply, payload, done) { done(null, payload) })
    app.get('/', async () => ({ hello: 'world' }))
    if (mode === 'static-client') for (let i = 0; i < CLIENT_REQUESTS; i++) await agentApi({ address }, 'GET', '/v1/agent/connect/ca/roots')
    if (mode === 'static-env') {
      const idle = Fastify({ https: httpsOptions() })
      await idle.register(consulNative, { service: 'api', agent: { address }, health: false, blockingWait: 600_000 })
      idle.get('/', async () => ({ hello: 'world' }))
      await idle.listen({ port: 0, host: '127.0.0.1' })
    }
  } else {
    app = Fastify({ https: httpsOptions() })
    // blockingWait at its maximum: a long poll that returns (at the latest after wait × 17/16) makes the
    // plugin parse and compile the answer (1,000 intentions), work that must not fall into a
    // measured window (runs under Valgrind last minutes).
    await app.register(consulNative, { service: 'api', agent: { address, worker: mode.endsWith('-worker') }, health: false, blockingWait: 600_000 })
    app.get('/', mode.startsWith('exempt') ? { config: { consulNative: false } } : {}, async () => ({ hello: 'world' }))
  }
  await app.listen({ port: 0, host: '127.0.0.1' })
  const timingServer = await startTimingEndpoint()
  process.once('SIGTERM', () => {
    // Connections left open by a load generator must not hold the exit.
    setTimeout(() => process.exit(0), 2000).unref()
    app.close().then(() => process.exit(0), () => process.exit(0))
  })
  process.stdout.write(`${app.server.address().port} ${timingServer.address().port}\n`)
}

main().catch((err) => {
  process.stderr.write(String(err.stack) + '\n')
  process.exit(1)
})
