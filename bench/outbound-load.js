'use strict'
// Outbound load, in its own process: `node bench/outbound-load.js <static|dispatcher> <agentAddress> <apiPort> <seconds>`.
//   static      a plain undici Pool with a fixed mTLS configuration (web's leaf and the roots, read once)
//   dispatcher  fastify.consulNative.dispatcher('api') of a `web` app running the plugin
// 16 concurrent keep-alive loops; prints requests/s as JSON.
const Fastify = require('fastify')
const { Pool, request } = require('undici')
const { consulNative, httpsOptions } = require('../dist/index.js')

const [mode, address, port, seconds] = process.argv.slice(2)

async function agentJson (path) {
  const res = await request(`${address}${path}`)
  return await res.body.json()
}

async function main () {
  let dispatcher
  let app = null
  if (mode === 'static') {
    const leaf = await agentJson('/v1/agent/connect/ca/leaf/web')
    const roots = await agentJson('/v1/agent/connect/ca/roots')
    dispatcher = new Pool(`https://127.0.0.1:${port}`, {
      connections: 16,
      connect: { key: leaf.PrivateKeyPEM, cert: leaf.CertPEM, ca: roots.Roots.map((r) => r.RootCert), checkServerIdentity: () => undefined }
    })
  } else {
    app = Fastify({ https: httpsOptions() })
    await app.register(consulNative, { service: 'web', agent: { address }, health: false })
    await app.ready()
    dispatcher = app.consulNative.dispatcher('api')
  }
  let done = 0
  let failed = 0
  const until = Date.now() + Number(seconds) * 1000
  const loop = async () => {
    while (Date.now() < until) {
      const res = await dispatcher.request({ origin: 'https://api.service.consul', path: '/', method: 'GET' })
      await res.body.dump()
      if (res.statusCode === 200) done++
      else failed++
    }
  }
  const started = Date.now()
  await Promise.all(Array.from({ length: 16 }, loop))
  const elapsed = (Date.now() - started) / 1000
  process.stdout.write(JSON.stringify({ rps: done / elapsed, failed }) + '\n')
  if (app !== null) await app.close()
  else await dispatcher.close()
}

main().catch((err) => {
  process.stderr.write(String(err.stack) + '\n')
  process.exit(1)
})
