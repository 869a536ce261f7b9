'use strict'
// What the end-to-end benchmarks (connections.js, instructions.js, outbound.js) and their load
// generators share: the statistics they print, the CPU time they read from /proc, core pinning,
// the server processes they start and stop, the mesh they serve and the framing of keep-alive
// responses.
const { spawn, spawnSync } = require('node:child_process')
const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')

/** The median of a list of numbers (the mean of the two middle ones for an even count). */
function median (values) {
  const sorted = [...values].sort((a, b) => a - b)
  const mid = sorted.length >> 1
  return sorted.length % 2 === 1 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2
}

/** `min–max` of a list, each with `digits` decimals. */
const spread = (values, digits) => `${Math.min(...values).toFixed(digits)}–${Math.max(...values).toFixed(digits)}`

/** A whole number with thousands separators. */
const int = (value) => Math.round(value).toLocaleString('en-US')

/**
 * A distribution-free 95% confidence interval for the median of `values`: the k-th smallest and
 * k-th largest value, for the largest k whose binomial tail P(X < k), X ~ Bin(n, ½), stays within
 * 2.5% (so coverage is at least 95%). With fewer than 6 values no such k exists, and the answer is
 * null. Rounds are independent (each has processes of its own), which is what the interval
 * assumes; it is how finely the run has located the median, where min–max only shows the spread.
 */
function medianInterval (values) {
  const sorted = [...values].sort((a, b) => a - b)
  const n = sorted.length
  let below = 0 // P(X < k), built term by term
  let term = 0.5 ** n // P(X = 0)
  let k = 0
  while (k < n / 2 && below + term <= 0.025) {
    below += term
    term = term * (n - k) / (k + 1)
    k++
  }
  return k === 0 ? null : [sorted[k - 1], sorted[n - k]]
}

/**
 * Per-round ratios as `median [95% interval of the median] (min–max)`, the median followed by
 * `suffix`. Below 9 rounds the interval is min–max itself (or does not exist), and is left out.
 */
const ratioCell = (ratios, digits, suffix = '') => {
  const interval = ratios.length < 9 ? null : medianInterval(ratios)
  const located = interval === null ? '' : ` [${interval.map((v) => v.toFixed(digits)).join('–')}]`
  return `${median(ratios).toFixed(digits)}${suffix}${located} (${spread(ratios, digits)})`
}

/**
 * The order of a round: even rounds rotate the list one step further each time, odd rounds run the
 * previous round's order backwards. Over 2n rounds every item runs at every position of n, first
 * and last included, exactly twice, and no pair always runs in the same order.
 */
function roundOrder (items, round) {
  const shift = (round >> 1) % items.length
  const rotated = [...items.slice(shift), ...items.slice(0, shift)]
  return round % 2 === 0 ? rotated : rotated.reverse()
}

/**
 * A process's CPU time so far from /proc/<pid>/stat (every thread), in µs: user and system
 * together, and user alone. `clockTicks` is the kernel's clock ticks per second (`getconf CLK_TCK`).
 */
function processCpuMicros (pid, clockTicks) {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'latin1')
  // Fields after the command name (which may contain spaces), from field 3 on.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
  const user = Number(fields[11]) * 1e6 / clockTicks
  return { total: user + Number(fields[12]) * 1e6 / clockTicks, user }
}

/**
 * Node options for a server process with a young generation of a fixed size: `--semi-space N`
 * (MiB per semi-space; V8's new space is two of them). V8 grows the young generation from 1 MiB
 * up to 16 MiB per semi-space as objects survive, at moments that depend on each process's history
 * (a process that allocated more while starting gets there sooner), and a larger one touches more
 * memory between collections. A long-running server ends at the maximum; a benchmark's server,
 * a few seconds old, may not. Fixing the size compares variants at the same young generation.
 * Empty when `semiSpace` is null (V8's own sizing).
 */
const youngGenerationArgs = (semiSpace) => semiSpace === null ? [] : [`--min-semi-space-size=${semiSpace}`, `--max-semi-space-size=${semiSpace}`]

/** Options that take no value: given means on. */
const SWITCHES = ['quick', 'reuse', 'cache-sim']

/**
 * Command-line flags: `--name value` or `--name=value` for each of `names`, and the switches
 * (`--quick`, `--reuse`, `--cache-sim`) alone. Anything else is refused with a clear message. Values stay strings.
 */
function readFlags (argv, names) {
  const flags = {}
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]
    if (!arg.startsWith('--')) throw new Error(`unexpected argument ${arg}`)
    const eq = arg.indexOf('=')
    const name = eq === -1 ? arg.slice(2) : arg.slice(2, eq)
    if (!names.includes(name)) throw new Error(`unknown option --${name}; one of ${names.map((o) => `--${o}`).join(', ')}`)
    if (SWITCHES.includes(name)) {
      if (eq !== -1) throw new Error(`--${name} takes no value`)
      flags[name] = 'true'
    } else if (eq !== -1) {
      flags[name] = arg.slice(eq + 1)
    } else {
      if (i + 1 >= argv.length) throw new Error(`--${name} needs a value`)
      flags[name] = argv[++i]
    }
  }
  return flags
}

/**
 * The options of a benchmark: each from its flag, else from `BENCH_<NAME>` in `env` (dashes as
 * underscores), else the fallback given. `quick`: whether `--quick` was given; `pick` reads a raw
 * value, `number` a positive finite number, `on` a switch (its flag, or its variable set to 1).
 */
function optionSource (argv, env, names) {
  const flags = readFlags(argv, names)
  const pick = (name, fallback) => flags[name] ?? env[`BENCH_${name.toUpperCase().replace(/-/g, '_')}`] ?? fallback
  const number = (name, fallback) => {
    const value = Number(pick(name, fallback))
    if (!(value > 0) || !Number.isFinite(value)) throw new Error(`--${name} must be a positive number`)
    return value
  }
  const on = (name) => ['true', '1'].includes(String(pick(name, 'false')))
  return { quick: on('quick'), pick, number, on }
}

/**
 * Core pinning for a benchmark run: `pin` is whether servers and load generators go to cores of
 * their own (two cores or more, and `taskset` present); if so, this process moves to core 1, with
 * the load generators. `clockTicks`: the kernel's clock ticks per second, for processCpuMicros.
 */
function pinning () {
  const pin = os.cpus().length >= 2 && spawnSync('taskset', ['-V']).status === 0
  if (pin) spawnSync('taskset', ['-a', '-p', '-c', '1', String(process.pid)])
  const clockTicks = Number(spawnSync('getconf', ['CLK_TCK']).stdout?.toString().trim()) || 100
  return { pin, clockTicks }
}

/** `[command, args]` running `args` pinned to `core` when `pin`, else as they are. */
function pinned (core, args, pin) {
  return pin ? ['taskset', ['-c', String(core), ...args]] : [args[0], args.slice(1)]
}

/** One line naming the machine and the software a run measured. */
function machineLine () {
  return `Machine: ${os.cpus()[0]?.model ?? 'unknown CPU'}, ${os.cpus().length} cores, Linux ${os.release()}, ` +
    `Node ${process.version}, OpenSSL ${process.versions.openssl}.`
}

/**
 * Starts a server process (bench/server.js, directly or under taskset or valgrind) and resolves
 * `{ child, port, timingPort }` from the first line it prints; its stderr is inherited. `label`
 * names it in errors.
 */
function startServerProcess (command, args, label) {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'inherit'] })
    let out = ''
    const onData = (chunk) => {
      out += chunk
      const end = out.indexOf('\n')
      if (end === -1) return
      child.stdout.off('data', onData)
      // Keep reading, so that a later line can never block the server on a full pipe.
      child.stdout.resume()
      const [port, timingPort] = out.slice(0, end).trim().split(/\s+/).map(Number)
      if (Number.isInteger(port) && port > 0) return resolve({ child, port, timingPort })
      child.kill('SIGTERM')
      reject(new Error(`${label} printed no port: ${JSON.stringify(out.slice(0, end))}`))
    }
    child.stdout.on('data', onData)
    child.once('error', reject)
    child.once('exit', (code, signal) => reject(new Error(`${label} exited with ${code ?? signal} before printing its port`)))
  })
}

/** Stops a server process (SIGTERM: it closes and exits, writing a profile if it has one); at once if it has exited. */
function stopProcess (child) {
  return new Promise((resolve) => {
    child.removeAllListeners('exit')
    if (child.exitCode !== null || child.signalCode !== null) return resolve()
    child.once('exit', resolve)
    child.kill('SIGTERM')
  })
}

/** A call to the dev agent's HTTP API; the answer parsed, null when empty. Any status but 200 fails. */
async function agentApi (agent, method, urlPath, body) {
  const { request } = require('undici')
  const res = await request(`${agent.address}${urlPath}`, { method, body: body === undefined ? undefined : JSON.stringify(body) })
  const text = await res.body.text()
  if (res.statusCode !== 200) throw new Error(`${method} ${urlPath}: ${res.statusCode} ${text}`)
  return text === '' ? null : JSON.parse(text)
}

/**
 * A dev agent with `intentions` intentions for `api`, where the caller `web` sorts last among the
 * exact names with an L7 permission, and web's credentials in files for the load generators:
 * `{ agent, files: { cert, key, ca }, close() }`. Loaded on use: load generators need none of it.
 */
async function startBenchMesh (intentions) {
  const { startDevAgent } = require('../dist/dev-agent/index.js')
  const agent = await startDevAgent({ defaultPolicy: 'deny' })
  await agentApi(agent, 'PUT', '/v1/config', { Kind: 'service-defaults', Name: 'api', Protocol: 'http' })
  const sources = [{ Name: 'web', Permissions: [{ Action: 'allow', HTTP: { PathPrefix: '/' } }] }]
  for (let i = 1; i < intentions; i++) sources.push({ Name: `svc-${String(i).padStart(5, '0')}`, Action: i % 2 === 0 ? 'allow' : 'deny' })
  await agentApi(agent, 'PUT', '/v1/config', { Kind: 'service-intentions', Name: 'api', Sources: sources })

  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fcn-bench-'))
  const leaf = await agentApi(agent, 'GET', '/v1/agent/connect/ca/leaf/web')
  const roots = await agentApi(agent, 'GET', '/v1/agent/connect/ca/roots')
  const files = { cert: path.join(dir, 'cert.pem'), key: path.join(dir, 'key.pem'), ca: path.join(dir, 'ca.pem') }
  fs.writeFileSync(files.cert, leaf.CertPEM)
  fs.writeFileSync(files.key, leaf.PrivateKeyPEM)
  fs.writeFileSync(files.ca, roots.Roots.map((r) => r.RootCert).join(''))
  return {
    agent,
    files,
    close: async () => {
      await agent.close()
      fs.rmSync(dir, { recursive: true, force: true })
    }
  }
}

/**
 * A socket 'data' listener that cuts the HTTP/1.1 responses of a keep-alive connection apart (by
 * Content-Length; the benchmark servers send no chunked bodies) and calls `onResponse(text)` with
 * each whole response.
 */
function responseFramer (onResponse) {
  let buffer = ''
  let expected = -1
  return (chunk) => {
    buffer += chunk.toString('latin1')
    for (;;) {
      if (expected === -1) {
        const end = buffer.indexOf('\r\n\r\n')
        if (end === -1) return
        const match = /\r\ncontent-length: *(\d+)/i.exec(buffer.slice(0, end))
        expected = end + 4 + (match === null ? 0 : Number(match[1]))
      }
      if (buffer.length < expected) return
      const response = buffer.slice(0, expected)
      buffer = buffer.slice(expected)
      expected = -1
      onResponse(response)
    }
  }
}

module.exports = { median, medianInterval, spread, int, ratioCell, roundOrder, youngGenerationArgs, processCpuMicros, optionSource, pinning, pinned, machineLine, startServerProcess, stopProcess, agentApi, startBenchMesh, responseFramer }
