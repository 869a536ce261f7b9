'use strict'
// Connection benchmark, run on demand (`npm run bench:connections`; `-- --quick` for a sanity run
// under a minute). What callers without keep-alive feel: server CPU per new connection (full TLS 1.3
// handshake with a client certificate, one GET, Connection: close), the same with resumed TLS 1.3
// sessions, p50/p99 connect+request latency, and keep-alive CPU per request, for:
//   static       Fastify with static mTLS options (leaf, key and roots from the same agent)
//   static-again static mTLS once more, in processes of its own: the control. Its ratios to static
//                are what two identical servers differ by in this run, the resolution of every other
//                ratio of the run (on a shared virtual machine this can be ±20%, far above the targets)
//   static-sni   the same with an SNICallback
//   static-hook  static mTLS with one empty onRequest hook (the floor of Fastify's hook machinery)
//   static-hooks static mTLS with an empty onRequest and an empty preParsing hook (the machinery of
//                the plugin's decision hook and its backstop, without their work)
//   static-client static-hooks in a process that has used an HTTP client (30 requests to the agent
//                before listening): the floor for any service that makes HTTP calls, as the plugin does
//   static-env   static-hooks, with the plugin running idle on a second app in the same process (the
//                cost to served requests of the plugin's agent client, watches and TLS state alone)
//   exempt       the plugin with the route exempt
//   plugin       the plugin enforcing 1,000 intentions (the caller's L7 intention sorts last)
//   exempt-worker, plugin-worker  the same two with `agent: { worker: true }` (agent traffic on a
//                worker thread)
// Server CPU is read from /proc/<pid>/stat (the server process only, every thread), user and
// system together and user alone. Keep-alive also reports the time each server spends in its
// request listener per request (timed inside bench/server.js, the same instrument in every
// variant): the plugin's hooks run there, so the difference to the static variants is the
// plugin's own per-request work, free of the kernel's and the load generator's round-to-round noise. Each server runs
// in its own process pinned to core 0, each load generator in its own process pinned to core 1
// (when the machine has two cores or more). Each measurement gets a server process of its own (a
// new one per variant, kind and round), warmed up unrecorded with the same load first: one process
// per variant for the whole run would carry its own memory layout (ASLR, heap, where the JIT puts
// code) into every round, a bias alternation cannot remove. Rounds rotate and alternate the order
// of the variants (every variant runs at every position); the output gives medians over rounds,
// the per-round ratios to static mTLS with a 95% interval of their median (from 9 rounds on) and
// their spread (min–max), as markdown tables. Never a best-of. The interval is the run's
// resolution: on a shared virtual machine, identical servers differ by several percent from one
// process to the next, so locating a median to ±2% takes tens of rounds (--rounds 40 or more).
//
// Options (flag or environment variable):
//   --seconds N      BENCH_SECONDS      measured seconds per run (default 2)
//   --warmup N       BENCH_WARMUP       seconds before each measured window (default 0.5)
//   --server-warmup N BENCH_SERVER_WARMUP seconds of unrecorded load on each new server process before
//                                       its measurement (default 5: startup JIT and first major GCs last
//                                       several seconds)
//   --reuse                             one server process per variant for the whole run (faster; the
//                                       figures keep each process's layout bias)
//   --rounds N       BENCH_ROUNDS       rounds, at least 5 for a published figure (default 6)
//   --concurrency N  BENCH_CONCURRENCY  concurrent connection loops / keep-alive connections (default 16)
//   --kinds a,b      BENCH_KINDS        full,resumed,keepalive
//   --variants a,b   BENCH_VARIANTS     static,static-again,static-sni,static-hook,static-hooks,static-client,static-env,exempt,plugin,
//                                       exempt-worker,plugin-worker (static is always run)
//   --intentions N   BENCH_INTENTIONS   intentions for `api` (default 1000)
//   --profile DIR    BENCH_PROFILE      run the servers under `node --cpu-prof`, profiles into DIR (one per
//                                       process: <variant>.<n>.cpuprofile, or <variant>.cpuprofile with --reuse)
//   --servername S   BENCH_SERVERNAME   clients send this SNI name (default none: they connect by IP
//                                       and send no SNI, so no SNICallback runs)
//   --json FILE      BENCH_JSON         also write every measurement as JSON
//   --semi-space N   BENCH_SEMI_SPACE   servers run with a young generation of a fixed size, N MiB per
//                                       semi-space (youngGenerationArgs in common.js; default: V8's own
//                                       sizing, which grows with each process's history: a server that
//                                       allocated more while starting reaches the maximum sooner)
//   --quick                             seconds 0.4, warmup 0.2, rounds 5, variants static,static-again,static-hook,plugin,
//                                       --reuse: direction only (about 40 s), not figures to publish
const { execFile } = require('node:child_process')
const { promisify } = require('node:util')
const fs = require('node:fs')
const path = require('node:path')
const { median, int, ratioCell, roundOrder, youngGenerationArgs, optionSource, pinning, pinned, machineLine, startServerProcess, stopProcess, startBenchMesh } = require('./common')

const ALL_VARIANTS = ['static', 'static-again', 'static-sni', 'static-hook', 'static-hooks', 'static-client', 'static-env', 'exempt', 'plugin', 'exempt-worker', 'plugin-worker']
const ALL_KINDS = ['full', 'resumed', 'keepalive']
const QUICK_VARIANTS = ['static', 'static-again', 'static-hook', 'plugin']

const OPTIONS = ['seconds', 'warmup', 'server-warmup', 'reuse', 'rounds', 'concurrency', 'kinds', 'variants', 'intentions', 'profile', 'json', 'servername', 'quick', 'semi-space']

function readOptions (argv, env) {
  const { quick, pick, number, on } = optionSource(argv, env, OPTIONS)
  const list = (name, all) => {
    const fallback = quick && name === 'variants' ? QUICK_VARIANTS : all
    const items = String(pick(name, fallback.join(','))).split(',').filter(Boolean)
    for (const item of items) if (!all.includes(item)) throw new Error(`--${name}: unknown ${item}; one of ${all.join(', ')}`)
    return all.filter((item) => items.includes(item) || (name === 'variants' && item === 'static'))
  }
  return {
    seconds: number('seconds', quick ? 0.4 : 2),
    warmup: number('warmup', quick ? 0.2 : 0.5),
    serverWarmup: number('server-warmup', 5),
    reuse: quick || on('reuse'),
    rounds: Math.round(number('rounds', quick ? 5 : 6)),
    concurrency: Math.round(number('concurrency', 16)),
    intentions: Math.round(number('intentions', 1000)),
    kinds: list('kinds', ALL_KINDS),
    variants: list('variants', ALL_VARIANTS),
    profile: pick('profile', null),
    semiSpace: pick('semi-space', null) === null ? null : Math.round(number('semi-space')),
    json: pick('json', null),
    servername: pick('servername', null),
    quick
  }
}

const LABELS = {
  static: 'static mTLS (no plugin)',
  'static-again': 'static mTLS again, other processes (control)',
  'static-sni': 'static mTLS + SNICallback',
  'static-hook': 'static mTLS + one empty onRequest hook',
  'static-hooks': 'static mTLS + empty onRequest and preParsing hooks',
  'static-client': 'the same, after using an HTTP client (30 requests)',
  'static-env': 'static + both empty hooks, plugin running idle on a second app',
  exempt: 'plugin, route exempt',
  plugin: 'plugin, N intentions',
  'exempt-worker': 'plugin with agent.worker, route exempt',
  'plugin-worker': 'plugin with agent.worker, N intentions'
}

const started = {}

function startServer (variant, address, opts, pin) {
  // A new process per run writes a profile per run: number them.
  started[variant] = (started[variant] ?? 0) + 1
  const name = opts.reuse ? variant : `${variant}.${started[variant]}`
  const nodeArgs = [...youngGenerationArgs(opts.semiSpace),
    ...opts.profile === null ? [] : ['--cpu-prof', '--cpu-prof-interval=100', `--cpu-prof-dir=${opts.profile}`, `--cpu-prof-name=${name}.cpuprofile`]]
  const [command, args] = pinned(0, [process.execPath, ...nodeArgs, path.join(__dirname, 'server.js'), variant, address], pin)
  return startServerProcess(command, args, `${variant} server`)
}

async function load (server, kind, seconds, warmup, opts, files, pin, clockTicks) {
  const config = {
    port: server.port,
    timingPort: server.timingPort,
    servername: opts.servername,
    kind,
    seconds,
    warmup,
    concurrency: opts.concurrency,
    serverPid: server.child.pid,
    clockTicks,
    ...files
  }
  const [command, args] = pinned(1, [process.execPath, path.join(__dirname, 'connection-load.js'), JSON.stringify(config)], pin)
  const { stdout } = await promisify(execFile)(command, args, { maxBuffer: 1 << 20 })
  const result = JSON.parse(stdout)
  if (result.failed > 0) throw new Error(`${server.variant} ${kind}: ${result.failed} failed requests`)
  if (result.ops === 0) throw new Error(`${server.variant} ${kind}: no request completed`)
  if (kind === 'resumed' && result.notResumed > result.ops * 0.01) {
    throw new Error(`${server.variant} resumed: ${result.notResumed} of ${result.ops} connections did not resume their session`)
  }
  return {
    rate: result.ops / result.seconds,
    cpuPerOp: result.cpuMicros / result.ops,
    userPerOp: result.userMicros / result.ops,
    requestMicros: result.requestMicros / result.requests,
    p50: result.p50,
    p99: result.p99
  }
}

const ms = (value) => `${value.toFixed(value < 10 ? 1 : 0)} ms`

function table (kind, results, opts) {
  const rows = []
  const runs = (variant) => results[variant][kind]
  const perRound = (variant, field, base, invert = false) => runs(variant).map((run, i) => {
    const ref = runs(base)[i][field]
    return invert ? ref / run[field] : run[field] / ref
  })
  const label = (variant) => LABELS[variant].replace('N intentions', `${int(opts.intentions)} intentions`)
  if (kind === 'keepalive') {
    // Capacity (static CPU / variant CPU) against static mTLS, and against the hook-machinery floors;
    // then the same on user CPU alone: the plugin's work is all in user space, while the kernel's
    // share (TCP, loopback) varies from round to round with how the load generator batches.
    const bases = [['static', 'vs static'], ['static-hook', 'vs static + empty hook'],
      ['static-hooks', 'vs static + both empty hooks'], ['static-client', 'vs the same + HTTP client used'], ['static-env', 'vs static + both hooks + idle plugin']].filter(([base]) => opts.variants.includes(base))
    for (const [field, title] of [['cpuPerOp', 'server CPU (user + system)'], ['userPerOp', 'server user CPU']]) {
      if (rows.length > 0) rows.push('')
      rows.push(`| server | req/s | ${title} per request | ${bases.map(([, name]) => `capacity ${name}`).join(' | ')} |`)
      rows.push(`|---|---|---|${'---|'.repeat(bases.length)}`)
      for (const variant of opts.variants) {
        const cpu = median(runs(variant).map((r) => r[field]))
        const cells = [label(variant), int(median(runs(variant).map((r) => r.rate))), `${cpu.toFixed(1)} µs`]
        for (const [base] of bases) cells.push(variant === base ? '1' : ratioCell(perRound(variant, field, base, true), 3))
        rows.push(`| ${cells.join(' | ')} |`)
      }
    }
    // The work a variant adds in the request listener, per round against each base, and what it is
    // as a share of static mTLS's whole CPU per request (the capacity it costs).
    const staticCpu = median(runs('static').map((r) => r.cpuPerOp))
    rows.push('', `| server | time in the request listener per request | ${bases.map(([, name]) => `added ${name} (share of static's CPU per request)`).join(' | ')} |`)
    rows.push(`|---|---|${'---|'.repeat(bases.length)}`)
    for (const variant of opts.variants) {
      const cells = [label(variant), `${int(median(runs(variant).map((r) => r.requestMicros * 1000)))} ns`]
      for (const [base] of bases) {
        if (variant === base) {
          cells.push('0')
          continue
        }
        const added = runs(variant).map((run, i) => (run.requestMicros - runs(base)[i].requestMicros) * 1000)
        const signed = (value, text) => `${value >= 0 ? '+' : '−'}${text(Math.abs(value))}`
        const ns = (value) => signed(value, int)
        const share = signed(median(added) / 1000 / staticCpu * 100, (v) => v.toFixed(1))
        cells.push(`${ns(median(added))} ns (${ns(Math.min(...added))}…${ns(Math.max(...added))}), ${share}%`)
      }
      rows.push(`| ${cells.join(' | ')} |`)
    }
  } else {
    rows.push('| server | new connections/s | server CPU per connection | vs static (per round) | p50 | p99 | p99 vs static (per round) |')
    rows.push('|---|---|---|---|---|---|---|')
    for (const variant of opts.variants) {
      const r = runs(variant)
      const isStatic = variant === 'static'
      rows.push(`| ${[label(variant), int(median(r.map((x) => x.rate))), `${int(median(r.map((x) => x.cpuPerOp)))} µs`,
        isStatic ? '1' : ratioCell(perRound(variant, 'cpuPerOp', 'static'), 2, '×'),
        ms(median(r.map((x) => x.p50))), ms(median(r.map((x) => x.p99))),
        isStatic ? '1' : ratioCell(perRound(variant, 'p99', 'static'), 2, '×')].join(' | ')} |`)
    }
  }
  return rows.join('\n')
}

function roundsTable (kind, results, opts) {
  const unit = kind === 'keepalive' ? 'request' : 'connection'
  const rows = []
  for (const [field, title] of [['cpuPerOp', 'server CPU'], ['userPerOp', 'server user CPU']]) {
    if (rows.length > 0) rows.push('')
    rows.push(`| ${title} per ${unit} (µs) | ${Array.from({ length: opts.rounds }, (_, i) => `round ${i + 1}`).join(' | ')} |`,
      `|---|${'---|'.repeat(opts.rounds)}`)
    for (const variant of opts.variants) {
      rows.push(`| ${variant} | ${results[variant][kind].map((r) => r[field].toFixed(kind === 'keepalive' ? 1 : 0)).join(' | ')} |`)
    }
  }
  return rows.join('\n')
}

const TITLES = {
  full: 'New connections, full TLS 1.3 handshake with a client certificate, one GET, Connection: close',
  resumed: 'New connections, resumed TLS 1.3 sessions, one GET, Connection: close',
  keepalive: 'Keep-alive, one request at a time per connection'
}

async function main () {
  const opts = readOptions(process.argv.slice(2), process.env)
  const { pin, clockTicks } = pinning()
  if (opts.profile !== null) fs.mkdirSync(opts.profile, { recursive: true })
  const startedAt = Date.now()

  const mesh = await startBenchMesh(opts.intentions)
  const { agent, files } = mesh

  const results = Object.fromEntries(opts.variants.map((variant) => [variant, Object.fromEntries(opts.kinds.map((kind) => [kind, []]))]))
  // --reuse: one process per variant, started once; otherwise a new one for every measurement.
  const reused = {}
  const serverFor = async (variant, kind) => {
    if (opts.reuse) return reused[variant]
    const server = { variant, ...await startServer(variant, agent.address, opts, pin) }
    try {
      await load(server, kind, opts.serverWarmup, 0, opts, files, pin, clockTicks)
    } catch (err) {
      await stopProcess(server.child)
      throw err
    }
    return server
  }
  try {
    if (opts.reuse) {
      for (const variant of opts.variants) reused[variant] = { variant, ...await startServer(variant, agent.address, opts, pin) }
      // One unrecorded pass so that every server has compiled its hot paths (a quick run relies on
      // each run's own warm-up).
      for (const kind of opts.quick ? [] : opts.kinds) {
        for (const variant of opts.variants) await load(reused[variant], kind, opts.seconds, opts.warmup, opts, files, pin, clockTicks)
      }
    }
    for (let round = 0; round < opts.rounds; round++) {
      for (const kind of opts.kinds) {
        // Rotate and alternate the order, so that every variant runs at every position.
        for (const variant of roundOrder(opts.variants, round)) {
          const server = await serverFor(variant, kind)
          try {
            results[variant][kind].push(await load(server, kind, opts.seconds, opts.warmup, opts, files, pin, clockTicks))
          } finally {
            if (!opts.reuse) await stopProcess(server.child)
          }
        }
      }
      process.stderr.write(`round ${round + 1}/${opts.rounds} done\n`)
    }
  } finally {
    await Promise.all(Object.values(reused).map(({ child }) => stopProcess(child)))
    await mesh.close()
  }

  const minutes = ((Date.now() - startedAt) / 60000).toFixed(1)
  const out = []
  out.push(machineLine())
  out.push(`Method: ${pin ? 'server pinned to core 0, load generator to core 1' : 'NOT pinned (one core, or no taskset)'}; ` +
    `${opts.rounds} rounds rotating the order of the variants, ${opts.seconds} s measured per run after ${opts.warmup} s of warm-up, ` +
    (opts.reuse ? 'one server process per variant for the whole run, ' : `a new server process per run, loaded unrecorded for ${opts.serverWarmup} s first, `) +
    `${opts.concurrency} concurrent connections, ${opts.servername === null ? 'by IP, without SNI' : `with SNI ${opts.servername}`}; ` +
    (opts.semiSpace === null ? '' : `young generation fixed at ${opts.semiSpace} MiB per semi-space; `) +
    'server CPU from /proc/<pid>/stat; medians over rounds; ' +
    `ratios are per round against static mTLS in the same round: median [95% interval of the median, from 9 rounds on] (min–max). Run took ${minutes} min.` +
    (opts.quick ? ' QUICK RUN: direction only, not figures to publish.' : ''))
  for (const kind of opts.kinds) {
    out.push('', `**${TITLES[kind]}**`, '', table(kind, results, opts), '', roundsTable(kind, results, opts))
  }
  process.stdout.write(out.join('\n') + '\n')
  if (opts.json !== null) fs.writeFileSync(opts.json, JSON.stringify({ opts, results }, null, 2))
}

main().catch((err) => {
  process.stderr.write(String(err.stack) + '\n')
  process.exit(1)
})
