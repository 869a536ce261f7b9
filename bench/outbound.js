'use strict'
// Outbound benchmark, run on demand (`npm run bench:outbound`): `web` calling `api` through
// fastify.consulNative.dispatcher() vs a plain undici Pool with a static mTLS configuration,
// side by side. The api server runs the plugin (bench/server.js); load runs in its own process.
const { spawn, execFile } = require('node:child_process')
const { promisify } = require('node:util')
const path = require('node:path')
const { request } = require('undici')
const { startDevAgent } = require('../dist/dev-agent/index.js')

// Asynchronous: the dev agent runs in this process and must keep answering during a run.
const run = async (args) => (await promisify(execFile)(process.execPath, args)).stdout

const SECONDS = Number(process.env.BENCH_SECONDS ?? 5)
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 2)
const MODES = ['static', 'dispatcher']

async function agentApi (agent, method, urlPath, body) {
  const res = await request(`${agent.address}${urlPath}`, { method, body: body === undefined ? undefined : JSON.stringify(body) })
  const text = await res.body.text()
  if (res.statusCode !== 200) throw new Error(`${method} ${urlPath}: ${res.statusCode} ${text}`)
  return text
}

async function main () {
  const agent = await startDevAgent({ defaultPolicy: 'deny' })
  await agentApi(agent, 'PUT', '/v1/config', { Kind: 'service-intentions', Name: 'api', Sources: [{ Name: 'web', Action: 'allow' }] })
  const server = spawn(process.execPath, [path.join(__dirname, 'server.js'), 'plugin', agent.address], { stdio: ['ignore', 'pipe', 'inherit'] })
  const port = await new Promise((resolve) => server.stdout.once('data', (chunk) => resolve(Number(String(chunk).trim()))))
  await agentApi(agent, 'PUT', '/v1/agent/service/register', { ID: 'api-bench', Name: 'api', Address: '127.0.0.1', Port: port, Connect: { Native: true } })

  const results = { static: [], dispatcher: [] }
  for (let round = 0; round < ROUNDS; round++) {
    for (const mode of round % 2 === 0 ? MODES : [...MODES].reverse()) {
      const args = [path.join(__dirname, 'outbound-load.js'), mode, agent.address, String(port)]
      await run([...args, '1'])
      const { rps, failed } = JSON.parse(await run([...args, String(SECONDS)]))
      if (failed > 0) throw new Error(`${mode}: ${failed} failed requests`)
      results[mode].push(rps)
    }
  }
  server.kill()
  await agent.close()
  const best = (list) => Math.max(...list)
  process.stdout.write(`\nweb -> api over mTLS (api runs the plugin), keep-alive, best of ${ROUNDS} x ${SECONDS}s (node ${process.version})\n\n`)
  process.stdout.write('client                                   req/s   vs static\n')
  const labels = { static: 'undici Pool, static mTLS', dispatcher: 'fastify.consulNative.dispatcher()' }
  for (const mode of MODES) {
    process.stdout.write(`${labels[mode].padEnd(36)}${best(results[mode]).toFixed(0).padStart(10)}   ${(best(results[mode]) / best(results.static)).toFixed(3).padStart(9)}\n`)
  }
}

main().catch((err) => {
  process.stderr.write(String(err.stack) + '\n')
  process.exit(1)
})
