'use strict'
// Outbound benchmark, run on demand (`npm run bench:outbound`; `-- --quick` for a sanity run well
// under a minute). `web` calling `api` over mTLS, keep-alive, `concurrency` loops of one GET / at a
// time, with three clients:
//   static      a plain undici Pool with a static mTLS configuration (web's leaf, key and roots from
//               the same agent, read once)
//   static-again the static client once more, in load generators of its own: the control. Its ratio
//               to static is how far two identical clients differ in the run, the resolution of
//               the dispatcher's ratio
//   dispatcher  fastify.consulNative.dispatcher('api') of a `web` app running the plugin
// The `api` server is the same for all: bench/server.js running the plugin (one process for the
// whole run, registered with the dev agent as a Connect-native instance of `api`). Per run: requests
// per second, CPU per request of the client process (the load generator, bench/outbound-load.js:
// process.cpuUsage(), every thread; the figure that matters most, since it is the dispatcher's own
// cost) and of the server process (from /proc/<pid>/stat, every thread), both over the measured
// window only. The server runs pinned to core 0, each load generator in its own process pinned to
// core 1 (when the machine has two cores or more). Rounds rotate and alternate the order of the clients
// (every client runs at every position), each run with a warm-up before its measured window; the
// output gives medians over rounds, the per-round ratios to the static client with a 95% interval
// of their median (from 9 rounds on) and their spread (min–max), and every round, as markdown
// tables. Never a best-of.
//
// Options (flag or environment variable):
//   --seconds N      BENCH_SECONDS      measured seconds per run (default 3)
//   --warmup N       BENCH_WARMUP       seconds before each measured window (default 0.5)
//   --rounds N       BENCH_ROUNDS       rounds, at least 5 for a published figure (default 6)
//   --concurrency N  BENCH_CONCURRENCY  concurrent request loops (default 16)
//   --quick                             seconds 0.5, warmup 0.25, rounds 5: direction only (about
//                                       20 s), not figures to publish
const { execFile } = require('node:child_process')
const { promisify } = require('node:util')
const path = require('node:path')
const { startDevAgent } = require('../dist/dev-agent/index.js')
const { median, int, ratioCell, roundOrder, optionSource, pinning, pinned, machineLine, startServerProcess, stopProcess, agentApi } = require('./common')

const CLIENTS = ['static', 'static-again', 'dispatcher']
// Each compared with static, per round.
const COMPARED = ['static-again', 'dispatcher']
const OPTIONS = ['seconds', 'warmup', 'rounds', 'concurrency', 'quick']

function readOptions (argv, env) {
  const { quick, number } = optionSource(argv, env, OPTIONS)
  const count = (name, fallback) => {
    const value = Math.round(number(name, fallback))
    if (value < 1) throw new Error(`--${name} must be at least 1`)
    return value
  }
  return {
    seconds: number('seconds', quick ? 0.5 : 3),
    warmup: number('warmup', quick ? 0.25 : 0.5),
    rounds: count('rounds', quick ? 5 : 6),
    concurrency: count('concurrency', 16),
    quick
  }
}

const LABELS = {
  static: 'undici Pool, static mTLS',
  'static-again': 'the same again, other processes (control)',
  dispatcher: "fastify.consulNative.dispatcher('api')"
}

/** The api server, running the plugin; resolves once it printed its port. */
function startServer (address, pin) {
  const [command, args] = pinned(0, [process.execPath, path.join(__dirname, 'server.js'), 'plugin', address], pin)
  return startServerProcess(command, args, 'api server')
}

async function load (client, server, agent, seconds, warmup, opts, pin, clockTicks) {
  const config = { mode: client, address: agent.address, port: server.port, seconds, warmup, concurrency: opts.concurrency, serverPid: server.child.pid, clockTicks }
  const [command, args] = pinned(1, [process.execPath, path.join(__dirname, 'outbound-load.js'), JSON.stringify(config)], pin)
  // Asynchronous: the dev agent runs in this process and must keep answering during a run.
  let stdout
  try {
    ({ stdout } = await promisify(execFile)(command, args, { maxBuffer: 1 << 20, timeout: (seconds + warmup + 60) * 1000 }))
  } catch (err) {
    const why = err.killed ? 'timed out' : `exited with ${err.code ?? err.signal}`
    throw new Error(`${client}: the load generator ${why}: ${String(err.stderr ?? err.message).trim()}`)
  }
  const result = JSON.parse(stdout)
  if (result.failed > 0) throw new Error(`${client}: ${result.failed} failed requests (first: ${result.firstError})`)
  if (result.ops === 0) throw new Error(`${client}: no request completed in the measured window`)
  return {
    rate: result.ops / result.seconds,
    clientPerOp: result.clientMicros / result.ops,
    clientUserPerOp: result.clientUserMicros / result.ops,
    serverPerOp: result.serverMicros / result.ops
  }
}

// What each run measures: [field, title, cell format].
const us = (value) => `${value.toFixed(1)} µs`
const METRICS = [
  ['clientPerOp', 'client CPU per request', us],
  ['clientUserPerOp', 'client user CPU per request', us],
  ['serverPerOp', 'server CPU per request', us],
  ['rate', 'req/s', int]
]

function summaryTable (results) {
  const rows = [`| client | ${METRICS.map(([, title]) => title).join(' | ')} |`, `|---|${'---|'.repeat(METRICS.length)}`]
  for (const client of CLIENTS) {
    rows.push(`| ${LABELS[client]} | ${METRICS.map(([field, , format]) => format(median(results[client].map((r) => r[field])))).join(' | ')} |`)
  }
  return rows.join('\n')
}

function ratioTable (results) {
  const rows = [`| per round, against static | ${COMPARED.map((client) => `${client} / static`).join(' | ')} |`, `|---|${'---|'.repeat(COMPARED.length)}`]
  for (const [field, title] of METRICS) {
    const cells = COMPARED.map((client) => ratioCell(results[client].map((run, i) => run[field] / results.static[i][field]), 3))
    rows.push(`| ${title} | ${cells.join(' | ')} |`)
  }
  return rows.join('\n')
}

function roundsTable (results, opts) {
  const rows = [`| per round | ${Array.from({ length: opts.rounds }, (_, i) => `round ${i + 1}`).join(' | ')} |`,
    `|---|${'---|'.repeat(opts.rounds)}`]
  for (const [field, title, format] of METRICS) {
    for (const client of CLIENTS) {
      rows.push(`| ${title}, ${client} | ${results[client].map((r) => format(r[field])).join(' | ')} |`)
    }
    for (const client of COMPARED) {
      const ratios = results[client].map((run, i) => (run[field] / results.static[i][field]).toFixed(3))
      rows.push(`| ${title}, ${client} / static | ${ratios.join(' | ')} |`)
    }
  }
  return rows.join('\n')
}

async function main () {
  const opts = readOptions(process.argv.slice(2), process.env)
  const { pin, clockTicks } = pinning()
  const startedAt = Date.now()

  const agent = await startDevAgent({ defaultPolicy: 'deny' })
  const results = Object.fromEntries(CLIENTS.map((client) => [client, []]))
  let server = null
  try {
    await agentApi(agent, 'PUT', '/v1/config', { Kind: 'service-intentions', Name: 'api', Sources: [{ Name: 'web', Action: 'allow' }] })
    server = await startServer(agent.address, pin)
    await agentApi(agent, 'PUT', '/v1/agent/service/register', { ID: 'api-bench', Name: 'api', Address: '127.0.0.1', Port: server.port, Connect: { Native: true } })
    // One unrecorded pass so that the server has compiled its hot paths (a quick run relies on
    // each run's own warm-up; every load generator is a new process and warms up in its own run).
    for (const client of opts.quick ? [] : CLIENTS) await load(client, server, agent, opts.seconds, opts.warmup, opts, pin, clockTicks)
    for (let round = 0; round < opts.rounds; round++) {
      // Rotate and alternate the order, so that every client runs at every position.
      for (const client of roundOrder(CLIENTS, round)) {
        results[client].push(await load(client, server, agent, opts.seconds, opts.warmup, opts, pin, clockTicks))
      }
      process.stderr.write(`round ${round + 1}/${opts.rounds} done\n`)
    }
  } finally {
    if (server !== null) await stopProcess(server.child)
    await agent.close()
  }

  const minutes = ((Date.now() - startedAt) / 60000).toFixed(1)
  const out = []
  out.push(machineLine())
  out.push(`Method: ${pin ? 'api server pinned to core 0, load generator to core 1' : 'NOT pinned (one core, or no taskset)'}; ` +
    `${opts.rounds} rounds rotating the order of the clients, ${opts.seconds} s measured per run after ${opts.warmup} s of warm-up, ` +
    `${opts.concurrency} concurrent keep-alive request loops; client CPU from process.cpuUsage() of the load generator, ` +
    'server CPU from /proc/<pid>/stat, both over the measured window; medians over rounds; ' +
    `ratios are per round, against the static client in the same round: median [95% interval of the median, from 9 rounds on] (min–max). Run took ${minutes} min.` +
    (opts.rounds < 5 ? ' FEWER THAN 5 ROUNDS: not figures to publish.' : '') +
    (opts.quick ? ' QUICK RUN: direction only, not figures to publish.' : ''))
  out.push('', '**web -> api over mTLS (api runs the plugin), keep-alive, one request at a time per loop**', '',
    summaryTable(results), '', ratioTable(results), '', roundsTable(results, opts))
  process.stdout.write(out.join('\n') + '\n')
}

main().catch((err) => {
  process.stderr.write(String(err.stack) + '\n')
  process.exit(1)
})
