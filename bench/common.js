'use strict'
// What the end-to-end benchmarks (connections.js, outbound.js) and their load generators share:
// the statistics they print and the CPU time they read from /proc.
const fs = require('node:fs')

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

/** Per-round ratios as `median (min–max)`, the median followed by `suffix`. */
const ratioCell = (ratios, digits, suffix = '') => `${median(ratios).toFixed(digits)}${suffix} (${spread(ratios, digits)})`

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
 * Command-line flags: `--name value` or `--name=value` for each of `names`, and `--quick` alone.
 * Anything else is refused with a clear message. Values stay strings.
 */
function readFlags (argv, names) {
  const flags = {}
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]
    if (!arg.startsWith('--')) throw new Error(`unexpected argument ${arg}`)
    const eq = arg.indexOf('=')
    const name = eq === -1 ? arg.slice(2) : arg.slice(2, eq)
    if (!names.includes(name)) throw new Error(`unknown option --${name}; one of ${names.map((o) => `--${o}`).join(', ')}`)
    if (name === 'quick') {
      if (eq !== -1) throw new Error('--quick takes no value')
      flags.quick = 'true'
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
 * The options of a benchmark: each from its flag, else from `BENCH_<NAME>` in `env`, else the
 * fallback given. `quick`: whether `--quick` was given; `pick` reads a raw value, `number` a
 * positive finite number.
 */
function optionSource (argv, env, names) {
  const flags = readFlags(argv, names)
  const pick = (name, fallback) => flags[name] ?? env[`BENCH_${name.toUpperCase()}`] ?? fallback
  const number = (name, fallback) => {
    const value = Number(pick(name, fallback))
    if (!(value > 0) || !Number.isFinite(value)) throw new Error(`--${name} must be a positive number`)
    return value
  }
  return { quick: flags.quick === 'true', pick, number }
}

module.exports = { median, spread, int, ratioCell, processCpuMicros, optionSource }
