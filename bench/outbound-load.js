'use strict'
// Load generator for bench/outbound.js, in its own process (pinned to its own core by the parent):
// `node bench/outbound-load.js '<json>'` with
//   { mode: 'static' | 'static-again' | 'dispatcher', address, port, seconds, warmup, concurrency, serverPid, clockTicks }
// static      a plain undici Pool with a fixed mTLS configuration (web's leaf and the roots, read
//             once from the agent at `address`), `concurrency` connections to 127.0.0.1:`port`
// static-again the same, under another name (the control of bench/outbound.js)
// dispatcher  fastify.consulNative.dispatcher('api') of a `web` app running the plugin (discovery
//             of `api` through the agent, the plugin's certificates, the peer identity check)
// `concurrency` loops, each one GET / at a time over keep-alive connections. After `warmup` seconds
// it reads its own CPU time (process.cpuUsage(): this process, every thread) and the server's (from
// /proc/<serverPid>/stat), counts the requests completed in the next `seconds`, reads both again,
// and prints one JSON line:
//   { ops, failed, firstError, seconds, clientMicros, clientUserMicros, serverMicros, serverUserMicros }
// `failed` counts every failed request, warm-up included (a non-200 answer or an error).
const { agentApi, processCpuMicros } = require('./common')
const Fastify = require('fastify')
const { Pool } = require('undici')
const { consulNative, httpsOptions } = require('../dist/index.js')

const config = JSON.parse(process.argv[2])
const MODES = ['static', 'static-again', 'dispatcher']
if (!MODES.includes(config.mode)) throw new Error(`unknown mode ${config.mode}; one of ${MODES.join(', ')}`)

/** This process's CPU time so far (every thread, µs resolution), user and system together, and user alone. */
function clientCpuMicros () {
  const { user, system } = process.cpuUsage()
  return { total: user + system, user }
}

const state = { measuring: false, stopped: false, ops: 0, failed: 0, firstError: null }

function fail (message) {
  state.failed++
  if (state.firstError === null) state.firstError = message
}

async function start () {
  if (config.mode === 'static' || config.mode === 'static-again') {
    const leaf = await agentApi(config, 'GET', '/v1/agent/connect/ca/leaf/web')
    const roots = await agentApi(config, 'GET', '/v1/agent/connect/ca/roots')
    const pool = new Pool(`https://127.0.0.1:${config.port}`, {
      connections: config.concurrency,
      connect: { key: leaf.PrivateKeyPEM, cert: leaf.CertPEM, ca: roots.Roots.map((r) => r.RootCert), checkServerIdentity: () => undefined }
    })
    return { dispatcher: pool, close: () => pool.close() }
  }
  const app = Fastify({ https: httpsOptions() })
  await app.register(consulNative, { service: 'web', agent: { address: config.address }, health: false })
  await app.ready()
  return { dispatcher: app.consulNative.dispatcher('api'), close: () => app.close() }
}

async function loop (dispatcher) {
  while (!state.stopped) {
    try {
      const res = await dispatcher.request({ origin: 'https://api.service.consul', path: '/', method: 'GET' })
      await res.body.dump()
      if (res.statusCode !== 200) fail(`status ${res.statusCode}`)
      else if (state.measuring) state.ops++
    } catch (err) {
      fail(`${err.code ?? err.name}: ${err.message}`)
    }
  }
}

async function main () {
  const { dispatcher, close } = await start()
  const loops = Array.from({ length: config.concurrency }, () => loop(dispatcher))
  await new Promise((resolve) => setTimeout(resolve, config.warmup * 1000))
  const serverBefore = processCpuMicros(config.serverPid, config.clockTicks)
  const clientBefore = clientCpuMicros()
  const started = performance.now()
  state.measuring = true
  await new Promise((resolve) => setTimeout(resolve, config.seconds * 1000))
  state.measuring = false
  const clientAfter = clientCpuMicros()
  const serverAfter = processCpuMicros(config.serverPid, config.clockTicks)
  const seconds = (performance.now() - started) / 1000
  state.stopped = true
  await Promise.all(loops)
  process.stdout.write(JSON.stringify({
    ops: state.ops,
    failed: state.failed,
    firstError: state.firstError,
    seconds,
    clientMicros: clientAfter.total - clientBefore.total,
    clientUserMicros: clientAfter.user - clientBefore.user,
    serverMicros: serverAfter.total - serverBefore.total,
    serverUserMicros: serverAfter.user - serverBefore.user
  }) + '\n')
  // Keep-alive connections must not hold the exit.
  setTimeout(() => process.exit(0), 2000).unref()
  await close()
}

main().catch((err) => {
  process.stderr.write(String(err.stack) + '\n')
  process.exit(1)
})
