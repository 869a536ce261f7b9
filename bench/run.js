'use strict'
// End-to-end benchmark, run on demand (`npm run bench`): the same hello-world app with a static
// mTLS configuration (without and with an SNICallback), with the plugin's dynamic TLS only (route
// exempt), and with the plugin enforcing 1,000 intentions. Keep-alive and new-connection (full handshake) loads, side by side.
// Each server and the load generator run in their own processes; rounds alternate the modes.
const { spawn, execFile } = require('node:child_process')
const { promisify } = require('node:util')
const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')
const { request } = require('undici')
const { startDevAgent } = require('../dist/dev-agent/index.js')

// Asynchronous: the dev agent runs in this process and must keep answering during a run.
const run = async (args) => (await promisify(execFile)(process.execPath, args)).stdout

const SECONDS = Number(process.env.BENCH_SECONDS ?? 5)
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 2)
const INTENTIONS = Number(process.env.BENCH_INTENTIONS ?? 1000)
const MODES = ['static', 'static-sni', 'exempt', 'plugin']

async function agentApi (agent, method, urlPath, body) {
  const res = await request(`${agent.address}${urlPath}`, { method, body: body === undefined ? undefined : JSON.stringify(body) })
  const text = await res.body.text()
  if (res.statusCode !== 200) throw new Error(`${method} ${urlPath}: ${res.statusCode} ${text}`)
  return JSON.parse(text)
}

function startServer (mode, address) {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [path.join(__dirname, 'server.js'), mode, address], { stdio: ['ignore', 'pipe', 'inherit'] })
    child.stdout.once('data', (chunk) => resolve({ child, port: Number(String(chunk).trim()) }))
    child.once('exit', (code) => reject(new Error(`${mode} server exited with ${code}`)))
  })
}

async function main () {
  const agent = await startDevAgent({ defaultPolicy: 'deny' })
  await agentApi(agent, 'PUT', '/v1/config', { Kind: 'service-defaults', Name: 'api', Protocol: 'http' })
  // 1,000 sources; the caller `web` sorts last among the exact names, with an L7 permission.
  const sources = [{ Name: 'web', Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/' } }] }]
  for (let i = 1; i < INTENTIONS; i++) sources.push({ Name: `svc-${String(i).padStart(5, '0')}`, Action: i % 2 === 0 ? 'allow' : 'deny' })
  await agentApi(agent, 'PUT', '/v1/config', { Kind: 'service-intentions', Name: 'api', Sources: sources })

  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fcn-bench-'))
  const leaf = await agentApi(agent, 'GET', '/v1/agent/connect/ca/leaf/web')
  const roots = await agentApi(agent, 'GET', '/v1/agent/connect/ca/roots')
  fs.writeFileSync(path.join(dir, 'cert.pem'), leaf.CertPEM)
  fs.writeFileSync(path.join(dir, 'key.pem'), leaf.PrivateKeyPEM)
  fs.writeFileSync(path.join(dir, 'ca.pem'), roots.Roots.map((r) => r.RootCert).join(''))

  const results = {}
  for (const mode of MODES) results[mode] = { keepalive: [], handshake: [] }
  for (let round = 0; round < ROUNDS; round++) {
    for (const mode of round % 2 === 0 ? MODES : [...MODES].reverse()) {
      const { child, port } = await startServer(mode, agent.address)
      for (const kind of ['keepalive', 'handshake']) {
        // Warm-up, then the measured run.
        await run([path.join(__dirname, 'load.js'), port, kind, '1', ...['cert.pem', 'key.pem', 'ca.pem'].map((f) => path.join(dir, f))])
        const out = await run([path.join(__dirname, 'load.js'), port, kind, String(SECONDS), ...['cert.pem', 'key.pem', 'ca.pem'].map((f) => path.join(dir, f))])
        const { rps, failed } = JSON.parse(String(out))
        if (failed > 0) throw new Error(`${mode} ${kind}: ${failed} failed requests`)
        results[mode][kind].push(rps)
      }
      child.removeAllListeners('exit')
      child.kill()
    }
  }
  await agent.close()
  fs.rmSync(dir, { recursive: true, force: true })

  const best = (list) => Math.max(...list)
  process.stdout.write(`\nhello-world over mTLS, ${INTENTIONS} intentions, best of ${ROUNDS} x ${SECONDS}s runs (node ${process.version}, ${os.cpus().length} cpus)\n\n`)
  process.stdout.write('mode                          keep-alive req/s   vs static   new-connection req/s   vs static\n')
  const labels = { static: 'static mTLS (no plugin)', 'static-sni': 'static mTLS + SNICallback', exempt: 'plugin, route exempt', plugin: `plugin, ${INTENTIONS} intentions` }
  for (const mode of MODES) {
    const ka = best(results[mode].keepalive)
    const hs = best(results[mode].handshake)
    const kaRatio = ka / best(results.static.keepalive)
    const hsRatio = hs / best(results.static.handshake)
    process.stdout.write(`${labels[mode].padEnd(30)}${ka.toFixed(0).padStart(16)}   ${kaRatio.toFixed(3).padStart(9)}   ${hs.toFixed(0).padStart(20)}   ${hsRatio.toFixed(3).padStart(9)}\n`)
  }
  process.stdout.write(`\nplugin with enforcement vs plugin exempt (keep-alive): ${(best(results.plugin.keepalive) / best(results.exempt.keepalive)).toFixed(3)}\n`)
}

main().catch((err) => {
  process.stderr.write(String(err.stack) + '\n')
  process.exit(1)
})
