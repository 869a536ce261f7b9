'use strict'
// Instructions per keep-alive request, counted under Valgrind's callgrind: run on demand
// (`npm run bench:instructions`; needs `valgrind`, e.g. `apt-get install valgrind`).
//
// Why: CPU time per request on a shared VM swings by up to 2× between periods, so a difference of
// a few hundred nanoseconds cannot be told from noise by timing. The number of instructions a
// request executes does not depend on the neighbours: processes of the same server, given the same
// requests, count within about ±1% of each other (up to 2%: where the JIT and the allocators place
// things), so differences of 1,500 instructions and more stand out. It does not see cache misses or
// the kernel's work, so it complements bench/connections.js (what users feel) and does not replace
// it: use it to compare variants and changes of the request path.
//
// Each variant of bench/server.js runs under callgrind, with counting off. One TLS connection
// sends `--warmup` requests one at a time (the JIT settles), counting is switched on for
// `--requests` more, then off, and the counts are dumped. Reported per request: all instructions
// of the process (every thread); the same without V8's optimizing compiler (it compiles on a
// background thread at moments that depend on timing, and it is the only part that varies from run
// to run); and the instructions spent in V8's megamorphic inline-cache builtins (property accesses
// that saw too many object shapes: Node's own HTTP and stream code, Fastify's request decorations).
// Rounds rotate and alternate the order of the variants; the table gives medians and the difference to
// static mTLS with one empty onRequest hook.
//
// Options (flag or environment variable):
//   --variants a,b   BENCH_VARIANTS   static,static-hook,static-hooks,static-client,static-env,exempt,plugin,
//                                     exempt-worker,plugin-worker (default all but static-env; variants as
//                                     in bench/server.js)
//   --warmup N       BENCH_WARMUP     requests before counting (default 30000)
//   --requests N     BENCH_REQUESTS   requests counted (default 5000)
//   --rounds N       BENCH_ROUNDS     (default 2)
//   --intentions N   BENCH_INTENTIONS intentions for `api` (default 1000)
//   --semi-space N   BENCH_SEMI_SPACE servers run with a young generation of a fixed size: N MiB per
//                                     semi-space (see youngGenerationArgs in common.js; default: V8's
//                                     own sizing, which grows with each process's history)
//   --cache-sim      BENCH_CACHE_SIM  also simulate caches and branch prediction (callgrind's
//                                     --cache-sim and --branch-sim; about twice as slow) and report
//                                     misses per request: instruction and data cache (first level and
//                                     last level) and mispredicted branches. A simulated machine, not
//                                     this one, but the same for every variant: it shows whether a
//                                     variant's CPU time goes beyond its instruction count because of
//                                     how it uses memory.
const { spawnSync, execFile } = require('node:child_process')
const { promisify } = require('node:util')
const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')
const tls = require('node:tls')
const { median, int, roundOrder, optionSource, youngGenerationArgs, machineLine, startServerProcess, stopProcess, startBenchMesh, responseFramer } = require('./common')

const ALL_VARIANTS = ['static', 'static-hook', 'static-hooks', 'static-client', 'static-env', 'exempt', 'plugin', 'exempt-worker', 'plugin-worker']
const DEFAULT_VARIANTS = ALL_VARIANTS.filter((variant) => variant !== 'static-env')
const BASE = 'static-hook'
const OPTIONS = ['variants', 'warmup', 'requests', 'rounds', 'intentions', 'cache-sim', 'semi-space']
const REQUEST = Buffer.from('GET / HTTP/1.1\r\nHost: api\r\n\r\n')
// Functions of V8's optimizing compiler (and the containers it uses), by symbol.
const COMPILER = /^(v8::internal::compiler::|v8::internal::Zone|v8::internal::maglev::|std::_Rb_tree)/
const MEGAMORPHIC = ['LoadIC_Megamorphic', 'KeyedLoadIC_Megamorphic', 'StoreIC_Megamorphic', 'KeyedStoreIC_Megamorphic']
// --cache-sim: callgrind's event names, summed into the columns reported.
const SIMULATED = [
  ['I1 misses', ['I1mr']],
  ['D1 misses', ['D1mr', 'D1mw']],
  ['last-level misses', ['ILmr', 'DLmr', 'DLmw']],
  ['mispredicted branches', ['Bcm', 'Bim']]
]

function readOptions (argv, env) {
  const { pick, number, on } = optionSource(argv, env, OPTIONS)
  const variants = String(pick('variants', DEFAULT_VARIANTS.join(','))).split(',').filter(Boolean)
  for (const variant of variants) if (!ALL_VARIANTS.includes(variant)) throw new Error(`--variants: unknown ${variant}; one of ${ALL_VARIANTS.join(', ')}`)
  return {
    variants: ALL_VARIANTS.filter((variant) => variants.includes(variant) || variant === BASE),
    warmup: Math.round(number('warmup', 30000)),
    requests: Math.round(number('requests', 5000)),
    rounds: Math.round(number('rounds', 2)),
    intentions: Math.round(number('intentions', 1000)),
    cacheSim: on('cache-sim'),
    semiSpace: pick('semi-space', null) === null ? null : Math.round(number('semi-space'))
  }
}

/** Sends `count` requests, one at a time, over `socket`; resolves when the last response is in. */
function sendSequentially (socket, count) {
  return new Promise((resolve, reject) => {
    let left = count
    const onResponse = (response) => {
      if (!response.startsWith('HTTP/1.1 200')) {
        reject(new Error(`unexpected response: ${response.slice(0, 40)}`))
        return
      }
      if (--left === 0) {
        socket.off('data', frame)
        socket.off('error', reject)
        resolve()
      } else {
        socket.write(REQUEST)
      }
    }
    const frame = responseFramer(onResponse)
    socket.on('data', frame)
    socket.once('error', reject)
    socket.write(REQUEST)
  })
}

/** Symbol → instructions, from a callgrind dump (its functions, self cost). */
async function functionCosts (dump) {
  const { stdout } = await promisify(execFile)('callgrind_annotate', ['--threshold=100', '--show=Ir', dump], { maxBuffer: 1 << 28 })
  const costs = new Map()
  for (const match of stdout.matchAll(/^ *([0-9,]+) \([ 0-9.]+%\) {2}(?:\?\?\?|[^:\n]*):([^\n[]+?)(?: \[[^\]\n]*\])?$/gm)) {
    const name = match[2].trim()
    if (name === 'PROGRAM TOTALS') continue
    costs.set(name, (costs.get(name) ?? 0) + Number(match[1].replace(/,/g, '')))
  }
  return costs
}

async function measure (variant, mesh, opts, dir, secureContext) {
  const out = path.join(dir, `${variant}.callgrind`)
  // --quiet: the server's stderr is ours, and only Valgrind's errors belong there.
  const simulation = opts.cacheSim ? ['--cache-sim=yes', '--branch-sim=yes'] : []
  const { child, port } = await startServerProcess('valgrind', ['--quiet', '--tool=callgrind', '--instr-atstart=no', '--smc-check=all-non-file',
    ...simulation, `--callgrind-out-file=${out}`, process.execPath, ...youngGenerationArgs(opts.semiSpace), path.join(__dirname, 'server.js'), variant, mesh.agent.address], `${variant} server`)
  try {
    const socket = tls.connect({ host: '127.0.0.1', port, secureContext, checkServerIdentity: () => undefined })
    await new Promise((resolve, reject) => socket.once('secureConnect', resolve).once('error', reject))
    await sendSequentially(socket, opts.warmup)
    const control = (...args) => promisify(execFile)('callgrind_control', [...args, String(child.pid)])
    await control('--instr=on')
    await sendSequentially(socket, opts.requests)
    await control('--instr=off')
    await control('--dump')
    socket.destroy()
    const dump = fs.readdirSync(dir).find((name) => name.startsWith(`${variant}.callgrind.`))
    if (dump === undefined) throw new Error(`${variant}: callgrind wrote no dump`)
    const text = fs.readFileSync(path.join(dir, dump), 'latin1')
    // `events:` names the columns of `totals:` (Ir first; with --cache-sim, the misses after it).
    const events = /^events: (.+)$/m.exec(text)?.[1].trim().split(/\s+/) ?? []
    const totals = (/^totals: (.+)$/m.exec(text)?.[1].trim().split(/\s+/) ?? []).map(Number)
    const event = (name) => totals[events.indexOf(name)] ?? 0
    const total = event('Ir')
    const costs = await functionCosts(path.join(dir, dump))
    let compiler = 0
    for (const [name, cost] of costs) if (COMPILER.test(name)) compiler += cost
    const perRequest = (value) => value / opts.requests
    return {
      total: perRequest(total),
      withoutCompiler: perRequest(total - compiler),
      megamorphic: Object.fromEntries(MEGAMORPHIC.map((name) => [name, perRequest(costs.get(`Builtins_${name}`) ?? 0)])),
      simulated: opts.cacheSim ? SIMULATED.map(([, names]) => perRequest(names.reduce((sum, name) => sum + event(name), 0))) : []
    }
  } finally {
    await stopProcess(child)
    for (const name of fs.readdirSync(dir)) if (name.startsWith(`${variant}.callgrind`)) fs.rmSync(path.join(dir, name))
  }
}

async function main () {
  const opts = readOptions(process.argv.slice(2), process.env)
  if (spawnSync('valgrind', ['--version']).status !== 0) {
    throw new Error('bench/instructions.js needs Valgrind (callgrind): apt-get install valgrind')
  }
  const startedAt = Date.now()
  const mesh = await startBenchMesh(opts.intentions)
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fcn-instructions-'))
  const secureContext = tls.createSecureContext({
    cert: fs.readFileSync(mesh.files.cert), key: fs.readFileSync(mesh.files.key), ca: fs.readFileSync(mesh.files.ca)
  })
  const results = Object.fromEntries(opts.variants.map((variant) => [variant, []]))
  try {
    for (let round = 0; round < opts.rounds; round++) {
      for (const variant of roundOrder(opts.variants, round)) results[variant].push(await measure(variant, mesh, opts, dir, secureContext))
      process.stderr.write(`round ${round + 1}/${opts.rounds} done\n`)
    }
  } finally {
    await mesh.close()
    fs.rmSync(dir, { recursive: true, force: true })
  }

  const med = (variant, pick) => median(results[variant].map(pick))
  const signed = (value) => `${value >= 0 ? '+' : '−'}${int(Math.abs(value))}`
  const rows = [
    machineLine(),
    `${int(opts.warmup)} requests of warm-up, ${int(opts.requests)} counted, ` +
      'one at a time over one keep-alive TLS connection; ' +
      (opts.semiSpace === null ? '' : `young generation fixed at ${opts.semiSpace} MiB per semi-space; `) +
      `${opts.rounds} rounds rotating the order of the variants; medians. ` +
      `Run took ${((Date.now() - startedAt) / 60000).toFixed(1)} min.`,
    '',
    `| server | instructions per request | without V8's optimizing compiler | vs ${BASE} | in megamorphic inline caches | per round (without the compiler) |`,
    '|---|---|---|---|---|---|'
  ]
  const base = med(BASE, (r) => r.withoutCompiler)
  for (const variant of opts.variants) {
    const withoutCompiler = med(variant, (r) => r.withoutCompiler)
    const megamorphic = med(variant, (r) => MEGAMORPHIC.reduce((sum, name) => sum + r.megamorphic[name], 0))
    rows.push(`| ${variant} | ${int(med(variant, (r) => r.total))} | ${int(withoutCompiler)} | ${variant === BASE ? '0' : signed(withoutCompiler - base)} | ` +
      `${int(megamorphic)} | ${results[variant].map((r) => int(r.withoutCompiler)).join(', ')} |`)
  }
  if (opts.cacheSim) {
    rows.push('', `Simulated by callgrind (--cache-sim, --branch-sim), per request, medians; difference to ${BASE}:`, '',
      `| server | ${SIMULATED.map(([title]) => title).join(' | ')} |`, `|---|${'---|'.repeat(SIMULATED.length)}`)
    for (const variant of opts.variants) {
      rows.push(`| ${variant} | ${SIMULATED.map((_, i) => {
        const value = med(variant, (r) => r.simulated[i])
        return variant === BASE ? int(value) : `${int(value)} (${signed(value - med(BASE, (r) => r.simulated[i]))})`
      }).join(' | ')} |`)
    }
  }
  rows.push('', `Megamorphic inline caches per request (median): ${opts.variants.map((variant) =>
    `${variant}: ${MEGAMORPHIC.map((name) => `${name} ${int(med(variant, (r) => r.megamorphic[name]))}`).join(', ')}`).join('; ')}.`)
  process.stdout.write(rows.join('\n') + '\n')
}

main().catch((err) => {
  process.stderr.write(String(err.stack) + '\n')
  process.exit(1)
})
