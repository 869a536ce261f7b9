// Go duration strings (`300s`, `1m30s`, `750ms`), as the Consul agent API reads and writes them.
// The plugin's side only; the dev agent reproduces Go's exact parser and error texts itself.

const UNIT_US: Record<string, number> = { ns: 0.001, us: 1, µs: 1, μs: 1, ms: 1_000, s: 1_000_000, m: 60_000_000, h: 3_600_000_000 }
const DURATION = /^(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+$/
const DURATION_PART = /(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)/g

/** A Go duration in microseconds (sub-microsecond parts rounded), or null when not one. Signs are refused. */
export function parseDurationUs (text: string): number | null {
  if (!DURATION.test(text)) return null
  let us = 0
  for (const [, amount, unit] of text.matchAll(DURATION_PART)) us += Number(amount) * (UNIT_US[unit as string] as number)
  return Math.round(us)
}

/** Whole microseconds → the shortest exact form of `30s`, `750ms`, `4500us`. */
export function formatDurationUs (us: number): string {
  if (us % 1_000_000 === 0) return `${us / 1_000_000}s`
  return us % 1_000 === 0 ? `${us / 1_000}ms` : `${us}us`
}
