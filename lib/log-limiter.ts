// Bounds the volume of a kind of log line that callers can trigger at will (denials, and lines
// like them), without hiding news (docs/semantics.md#log-limits): the first line of each new key
// (caller and route) is always written; repeats are sampled one in `sample`, and at most
// `perSecond` of those are written per second. The number of lines left out is carried by the
// next line written, or by a summary once the lines stop. Memory is bounded: the keys seen live in
// an LRU. Reusable for any such line (shadow mode's would-be denials, for one).
import { LRUCache } from 'lru-cache'

/** The `logDenials` option. */
export interface LogLimit {
  /** One repeat in `sample` may be written (1: every repeat). */
  readonly sample: number
  /** At most this many repeats written per second, over all keys (0: only first lines). */
  readonly perSecond: number
}

export const DEFAULT_LOG_LIMIT: LogLimit = Object.freeze({ sample: 1, perSecond: 10 })

/** admit()'s answer for a line to leave out. */
export const SUPPRESS = -1

export interface LogLimiterOptions {
  /** Called with the number of lines left out when no written line has reported them within `summaryDelayMs`. */
  readonly onSummary: (suppressed: number) => void
  /** How many keys are remembered; the least recently seen is forgotten first. Default 10 000. */
  readonly maxKeys?: number
  /** Default 5 000. */
  readonly summaryDelayMs?: number
}

export class LogLimiter {
  readonly #sample: number
  readonly #perSecond: number
  readonly #onSummary: (suppressed: number) => void
  readonly #summaryDelayMs: number
  readonly #seen: LRUCache<string, true>
  #tokens: number
  #refilledAt = 0
  #repeats = 0
  #suppressed = 0
  #summary: NodeJS.Timeout | null = null

  constructor (limit: LogLimit, opts: LogLimiterOptions) {
    this.#sample = limit.sample
    this.#perSecond = limit.perSecond
    this.#tokens = limit.perSecond
    this.#onSummary = opts.onSummary
    this.#summaryDelayMs = opts.summaryDelayMs ?? 5_000
    this.#seen = new LRUCache({ max: opts.maxKeys ?? 10_000 })
  }

  /**
   * Whether to write a line for `key` at time `now` (ms): SUPPRESS to leave it out, otherwise the
   * number of lines left out since the last one written (for the line to report).
   */
  admit (key: string, now: number): number {
    if (this.#seen.get(key) === undefined) {
      this.#seen.set(key, true)
      return this.#written()
    }
    this.#repeats++
    if (this.#repeats % this.#sample !== 0 || !this.#takeToken(now)) {
      this.#suppress()
      return SUPPRESS
    }
    return this.#written()
  }

  /** Stops the pending summary (its count is dropped with it). */
  close (): void {
    if (this.#summary !== null) clearTimeout(this.#summary)
    this.#summary = null
  }

  #takeToken (now: number): boolean {
    if (this.#perSecond === 0) return false
    // A bucket of `perSecond` tokens, refilled continuously.
    const refill = (now - this.#refilledAt) * this.#perSecond / 1000
    this.#tokens = Math.min(this.#perSecond, this.#tokens + refill)
    this.#refilledAt = now
    if (this.#tokens < 1) return false
    this.#tokens--
    return true
  }

  #written (): number {
    const suppressed = this.#suppressed
    this.#suppressed = 0
    return suppressed
  }

  #suppress (): void {
    this.#suppressed++
    if (this.#summary !== null) return
    this.#summary = setTimeout(() => {
      this.#summary = null
      const suppressed = this.#written()
      if (suppressed > 0) this.#onSummary(suppressed)
    }, this.#summaryDelayMs)
    this.#summary.unref()
  }
}
