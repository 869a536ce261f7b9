'use strict'
// How finely can this machine compare servers? Run on demand (`npm run bench:spread`) before
// trusting CPU-time ratios of a few percent. It runs `copies` processes of the same
// bench/server.js variant side by side (pinned to core 0), opens `concurrency` keep-alive TLS
// connections to each from this process (pinned to core 1), and loads the processes in turn, one
// slice of `slice` ms each, for `seconds`. Each slice's CPU time comes from
// /proc/<pid>/task/*/schedstat (every thread of the server, in ns), after `settle` ms of load.
// Identical servers measured in slices a few hundred milliseconds apart share the machine's
// moment, so what still differs between them belongs to the processes (or to their connections):
// the resolution of any comparison of CPU per request between processes. Prints, per process, the
// median CPU per request over its slices and its quartiles, and the ratio of the slowest median to
// the fastest.
//
// Options (flag or environment variable):
//   --variant V      BENCH_VARIANT      the bench/server.js variant (default static)
//   --copies N       BENCH_COPIES       processes of it (default 6)
//   --seconds N      BENCH_SECONDS      measured seconds, all processes together (default 60)
//   --slice N        BENCH_SLICE        ms measured per slice (default 100)
//   --settle N       BENCH_SETTLE       ms of load before each slice is measured (default 20)
//   --concurrency N  BENCH_CONCURRENCY  keep-alive connections per process (default 16)
//   --intentions N   BENCH_INTENTIONS   intentions for `api` (default 1000)
//   --semi-space N   BENCH_SEMI_SPACE   servers run with a young generation of a fixed size, N MiB per
//                                       semi-space (youngGenerationArgs in common.js; default: V8's own)
const fs = require('node:fs')
const path = require('node:path')
const tls = require('node:tls')
const { median, optionSource, youngGenerationArgs, pinning, pinned, machineLine, startServerProcess, stopProcess, startBenchMesh, responseFramer } = require('./common')

const OPTIONS = ['variant', 'copies', 'seconds', 'slice', 'settle', 'concurrency', 'intentions', 'semi-space']
const REQUEST = Buffer.from('GET / HTTP/1.1\r\nHost: api\r\n\r\n')
const WARMUP_MS = 3000

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

function readOptions (argv, env) {
  const { pick, number } = optionSource(argv, env, OPTIONS)
  return {
    variant: String(pick('variant', 'static')),
    copies: Math.max(2, Math.round(number('copies', 6))),
    seconds: number('seconds', 60),
    slice: number('slice', 100),
    settle: number('settle', 20),
    concurrency: Math.round(number('concurrency', 16)),
    intentions: Math.round(number('intentions', 1000)),
    semiSpace: pick('semi-space', null) === null ? null : Math.round(number('semi-space'))
  }
}

/** CPU time of every thread of a process so far, in ns (schedstat: time on a CPU). */
function processCpuNanos (pid) {
  let sum = 0
  for (const task of fs.readdirSync(`/proc/${pid}/task`)) {
    try {
      sum += Number(fs.readFileSync(`/proc/${pid}/task/${task}/schedstat`, 'latin1').split(' ')[0])
    } catch {
      // A thread that ended between the listing and the read: its time is gone with it.
    }
  }
  return sum
}

/**
 * `concurrency` keep-alive connections to one server that send their next request only while the
 * server is loaded (`load(true)`); a response that arrives after `load(false)` parks its connection.
 * `failure`: why a connection broke, or null.
 */
function connectionsTo (server, secureContext, concurrency) {
  const state = { on: false, closing: false, responses: 0, failure: null, parked: [] }
  const sockets = []
  const opened = []
  for (let i = 0; i < concurrency; i++) {
    const socket = tls.connect({ host: '127.0.0.1', port: server.port, secureContext, minVersion: 'TLSv1.3', checkServerIdentity: () => undefined })
    const send = () => socket.write(REQUEST)
    socket.on('data', responseFramer((response) => {
      if (!response.startsWith('HTTP/1.1 200')) state.failure ??= `an answer ${JSON.stringify(response.slice(0, 40))}`
      state.responses++
      if (state.on) send()
      else state.parked.push(send)
    }))
    socket.on('close', () => { if (!state.closing) state.failure ??= 'a connection closed' })
    opened.push(new Promise((resolve, reject) => socket.once('secureConnect', resolve).once('error', reject)))
    state.parked.push(send)
    sockets.push(socket)
  }
  return {
    state,
    ready: Promise.all(opened),
    load (on) {
      if (state.failure !== null) throw new Error(`${server.label}: ${state.failure}`)
      state.on = on
      if (!on) return
      const parked = state.parked
      state.parked = []
      for (const send of parked) send()
    },
    close () {
      state.closing = true
      for (const socket of sockets) socket.destroy()
    }
  }
}

const quantile = (values, q) => [...values].sort((a, b) => a - b)[Math.floor(q * (values.length - 1))]
const micros = (ns) => (ns / 1000).toFixed(1)

async function main () {
  const opts = readOptions(process.argv.slice(2), process.env)
  if (!fs.existsSync('/proc/self/schedstat')) throw new Error('bench/spread.js reads /proc/<pid>/task/*/schedstat, which this system does not have (Linux with schedstats)')
  const { pin } = pinning()
  const mesh = await startBenchMesh(opts.intentions)
  const secureContext = tls.createSecureContext({
    cert: fs.readFileSync(mesh.files.cert), key: fs.readFileSync(mesh.files.key), ca: fs.readFileSync(mesh.files.ca), minVersion: 'TLSv1.3'
  })
  const servers = []
  try {
    for (let copy = 1; copy <= opts.copies; copy++) {
      const [command, args] = pinned(0, [process.execPath, ...youngGenerationArgs(opts.semiSpace), path.join(__dirname, 'server.js'), opts.variant, mesh.agent.address], pin)
      const label = `${opts.variant} #${copy}`
      servers.push({ label, ...await startServerProcess(command, args, label), slices: [] })
    }
    for (const server of servers) {
      server.connections = connectionsTo(server, secureContext, opts.concurrency)
      await server.connections.ready
    }
    // Each process warms up alone first: its startup compilation and first collections.
    for (const server of servers) {
      server.connections.load(true)
      await sleep(WARMUP_MS)
      server.connections.load(false)
    }
    const until = Date.now() + opts.seconds * 1000
    for (let rotation = 0; Date.now() < until; rotation++) {
      // Alternate the order, so that no process always follows the same one.
      for (const server of rotation % 2 === 0 ? servers : [...servers].reverse()) {
        const { connections } = server
        connections.load(true)
        await sleep(opts.settle)
        const cpuBefore = processCpuNanos(server.child.pid)
        const before = connections.state.responses
        await sleep(opts.slice)
        const cpu = processCpuNanos(server.child.pid) - cpuBefore
        const responses = connections.state.responses - before
        connections.load(false)
        if (responses > 0) server.slices.push(cpu / responses)
        await sleep(10)
      }
    }
  } finally {
    for (const server of servers) server.connections?.close()
    await Promise.all(servers.map(({ child }) => stopProcess(child)))
    await mesh.close()
  }

  for (const server of servers) if (server.slices.length === 0) throw new Error(`${server.label}: no slice measured; raise --seconds`)
  const medians = servers.map((server) => median(server.slices))
  const out = [machineLine(),
    `Method: ${opts.copies} processes of the ${opts.variant} server pinned to ${pin ? 'core 0, the load generator to core 1' : 'no core (one core, or no taskset)'}; ` +
    `each loaded alone for ${WARMUP_MS / 1000} s, then in turn, ${opts.slice} ms measured per slice after ${opts.settle} ms of load, for ${opts.seconds} s; ` +
    `${opts.concurrency} keep-alive connections each; ` +
    `young generation ${opts.semiSpace === null ? 'sized by V8' : `fixed at ${opts.semiSpace} MiB per semi-space`}; server CPU from /proc/<pid>/task/*/schedstat.`,
    '',
    '| process | slices | CPU per request, median | 25th–75th percentile |',
    '|---|---|---|---|']
  for (const server of servers) {
    out.push(`| ${server.label} | ${server.slices.length} | ${micros(median(server.slices))} µs | ${micros(quantile(server.slices, 0.25))}–${micros(quantile(server.slices, 0.75))} µs |`)
  }
  out.push('', `Slowest median / fastest median: ${(Math.max(...medians) / Math.min(...medians)).toFixed(2)}. ` +
    'Ratios of CPU per request between processes are not resolved more finely than this on this machine now.')
  process.stdout.write(out.join('\n') + '\n')
}

main().catch((err) => {
  process.stderr.write(String(err.stack) + '\n')
  process.exit(1)
})
