// Blocking-query machinery of the dev agent (docs/semantics.md#blocking-queries): the Raft-like index, Go duration
// parsing for `wait`, Consul's timeout rules, and waiters that are released on change or close.
import { DURATION_UNIT_NS } from './go'
import { DevAgentHttpError } from './http-error'

/** Consul's default blocking wait (`DefaultQueryTime`). */
export const DEFAULT_WAIT_MS = 5 * 60_000
/** Consul's maximum blocking wait (`MaxQueryTime`); longer waits are clamped. */
export const MAX_WAIT_MS = 10 * 60_000
/** Consul adds a random extra of up to wait/16 (`structs.JitterFraction`). */
export const JITTER_FRACTION = 16

const NS_PER_MS = 1_000_000n
const MAX_DURATION_NS = (1n << 63n) - 1n

/**
 * Parses a Go duration (`time.ParseDuration`): `[-+]?([0-9]*(\.[0-9]*)?[a-z]+)+` or `0`.
 * Returns nanoseconds, or null when Go would reject the text.
 */
export function parseGoDurationNs (text: string): bigint | null {
  let s = text
  let negative = false
  if (s.startsWith('-') || s.startsWith('+')) {
    negative = s.startsWith('-')
    s = s.slice(1)
  }
  if (s === '0') return 0n
  if (s === '') return null
  let total = 0n
  while (s !== '') {
    const number = /^(\d*)(?:\.(\d*))?/.exec(s) as RegExpExecArray
    const whole = number[1] as string
    const fraction = number[2]
    // Go needs at least one digit on one side of the dot.
    if (whole === '' && (fraction === undefined || fraction === '')) return null
    s = s.slice(number[0].length)
    const unit = /^[^\d.]*/.exec(s)?.[0] as string
    const scale = DURATION_UNIT_NS[unit]
    if (scale === undefined) return null
    s = s.slice(unit.length)
    let value = BigInt(whole === '' ? '0' : whole) * scale
    if (fraction !== undefined && fraction !== '') {
      value += BigInt(fraction) * scale / 10n ** BigInt(fraction.length)
    }
    total += value
    if (total > MAX_DURATION_NS) return null
  }
  return negative ? -total : total
}

/** Go duration text → milliseconds (possibly fractional), or null when invalid. */
export function parseGoDuration (text: string): number | null {
  const ns = parseGoDurationNs(text)
  return ns === null ? null : Number(ns) / Number(NS_PER_MS)
}

/** Formats nanoseconds like Go's `time.Duration.String()` (`72h0m0s`, `1.5s`, `500ms`). */
export function formatGoDurationNs (ns: bigint): string {
  if (ns === 0n) return '0s'
  const sign = ns < 0n ? '-' : ''
  const abs = ns < 0n ? -ns : ns
  if (abs < 1_000_000_000n) {
    if (abs < 1_000n) return `${sign}${abs}ns`
    if (abs < 1_000_000n) return `${sign}${fixed(abs, 1_000n)}µs`
    return `${sign}${fixed(abs, 1_000_000n)}ms`
  }
  const hours = abs / 3_600_000_000_000n
  const minutes = (abs / 60_000_000_000n) % 60n
  const seconds = fixed(abs % 60_000_000_000n, 1_000_000_000n)
  if (hours > 0n) return `${sign}${hours}h${minutes}m${seconds}s`
  if (minutes > 0n) return `${sign}${minutes}m${seconds}s`
  return `${sign}${seconds}s`
}

/** Milliseconds → Go duration text. */
export function formatGoDuration (ms: number): string {
  return formatGoDurationNs(BigInt(Math.round(ms * 1_000_000)))
}

function fixed (value: bigint, unit: bigint): string {
  const whole = value / unit
  const rest = value % unit
  if (rest === 0n) return String(whole)
  const digits = String(unit).length - 1
  return `${whole}.${String(rest).padStart(digits, '0').replace(/0+$/, '')}`
}

export interface BlockingParams {
  /** `?index`; 0 when absent (the query then answers at once). */
  index: number
  /** `?wait` in milliseconds; undefined when absent. */
  waitMs: number | undefined
}

/** Reads `index` and `wait` as Consul's `parseWait` does: unparsable values are a 400. */
export function parseBlockingParams (query: URLSearchParams): BlockingParams {
  const wait = query.get('wait')
  let waitMs: number | undefined
  if (wait !== null && wait !== '') {
    const parsed = parseGoDuration(wait)
    if (parsed === null) throw new DevAgentHttpError(400, 'Invalid wait time')
    waitMs = parsed
  }
  const rawIndex = query.get('index')
  let index = 0
  if (rawIndex !== null && rawIndex !== '') {
    // Go's strconv.ParseUint: decimal digits only, at most 2^64-1.
    if (!/^\d+$/.test(rawIndex) || BigInt(rawIndex) > 0xffff_ffff_ffff_ffffn) {
      throw new DevAgentHttpError(400, 'Invalid index')
    }
    index = Number(rawIndex)
  }
  return { index, waitMs }
}

/**
 * Consul's RPC timeout rule: a missing or non-positive wait becomes the default, a longer one is
 * clamped to the maximum, then up to wait/16 of random jitter is added.
 */
export function queryTimeout (waitMs: number | undefined, random: () => number = Math.random): number {
  let wait = waitMs === undefined || waitMs <= 0 ? DEFAULT_WAIT_MS : waitMs
  if (wait > MAX_WAIT_MS) wait = MAX_WAIT_MS
  return wait + Math.floor(random() * (wait / JITTER_FRACTION))
}

export type WaitOutcome = 'changed' | 'timeout' | 'closed' | 'aborted'

interface Waiter {
  topics: ReadonlySet<string>
  settle: (outcome: WaitOutcome) => void
}

/**
 * The Raft-like index plus change notification. Every write takes `nextIndex()`, then calls
 * `notify(topic)` so that the waiters registered on that topic re-run their query.
 */
export class ChangeHub {
  #index: number
  #waiters = new Set<Waiter>()
  #closed = false
  // Notification sequence, global and per topic, so that a query can tell whether one of its
  // topics changed between computing its result and starting to wait.
  #seq = 0
  #topicSeq = new Map<string, number>()

  constructor (startIndex = 0) {
    this.#index = startIndex
  }

  /** The highest index handed out so far. */
  get index (): number {
    return this.#index
  }

  get closed (): boolean {
    return this.#closed
  }

  /** Number of pending waiters (for tests and close()). */
  get waiting (): number {
    return this.#waiters.size
  }

  /** The number of notifications so far. */
  get seq (): number {
    return this.#seq
  }

  nextIndex (): number {
    this.#index += 1
    return this.#index
  }

  notify (topic: string): void {
    this.#seq += 1
    this.#topicSeq.set(topic, this.#seq)
    for (const waiter of [...this.#waiters]) {
      if (waiter.topics.has(topic)) waiter.settle('changed')
    }
  }

  /**
   * Resolves on the first change of one of `topics`, at the timeout, on close or on abort. With
   * `since` (a `seq` value), a change notified after it counts even if it came before this call.
   */
  async wait (topics: readonly string[], timeoutMs: number, signal?: AbortSignal, since?: number): Promise<WaitOutcome> {
    if (this.#closed) return 'closed'
    if (signal?.aborted === true) return 'aborted'
    if (since !== undefined && topics.some((topic) => (this.#topicSeq.get(topic) ?? 0) > since)) return 'changed'
    return await new Promise<WaitOutcome>((resolve) => {
      const onAbort = (): void => waiter.settle('aborted')
      const timer = setTimeout(() => waiter.settle('timeout'), Math.max(0, timeoutMs))
      const waiter: Waiter = {
        topics: new Set(topics),
        settle: (outcome) => {
          clearTimeout(timer)
          signal?.removeEventListener('abort', onAbort)
          this.#waiters.delete(waiter)
          resolve(outcome)
        }
      }
      signal?.addEventListener('abort', onAbort, { once: true })
      this.#waiters.add(waiter)
    })
  }

  /** Releases every waiter; later waits return at once. */
  close (): void {
    this.#closed = true
    for (const waiter of [...this.#waiters]) waiter.settle('closed')
  }
}

export interface BlockOptions<T> {
  hub: ChangeHub
  topics: readonly string[]
  timeoutMs: number
  signal?: AbortSignal | undefined
  /** Computes the current result. */
  run: () => T | Promise<T>
  /** Whether a result may be returned; `first` is true for the result computed before blocking. */
  ready: (result: T, first: boolean) => boolean
}

/**
 * Runs a blocking query: answers at once when the first result is ready, otherwise re-runs the
 * query on every change of its topics until it is ready, and answers with the latest result at
 * the timeout (a same-index answer, as Consul's), on close, or when the client went away.
 */
export async function block<T> (opts: BlockOptions<T>): Promise<T> {
  let since = opts.hub.seq
  let result = await opts.run()
  if (opts.ready(result, true)) return result
  const deadline = Date.now() + opts.timeoutMs
  for (;;) {
    const outcome = await opts.hub.wait(opts.topics, deadline - Date.now(), opts.signal, since)
    if (outcome !== 'changed') return result
    since = opts.hub.seq
    result = await opts.run()
    if (opts.ready(result, false)) return result
  }
}

/**
 * Index-based readiness (`?index=N`): ready when no index was given or the index moved past N.
 * With `hash`, a wake-up whose result hashes like the first one keeps blocking, as Consul's
 * intention match does to suppress spurious wake-ups.
 */
export function indexReady<T extends { index: number, hash?: string }> (minIndex: number): (result: T, first: boolean) => boolean {
  let firstHash: string | undefined
  return (result, first) => {
    if (first) firstHash = result.hash
    if (minIndex === 0) return true
    if (result.index <= minIndex) return false
    return first || result.hash === undefined || result.hash !== firstHash
  }
}
