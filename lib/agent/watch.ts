// A blocking-query loop that keeps one agent value current (docs/semantics.md#blocking-queries). It never throws and
// never gives up: failures keep the last good value, back off with full jitter, and are logged once
// per distinct cause; recovery is logged once. Timers are unref()'d and stop() aborts the poll in
// flight, so a stopped watch holds nothing open.
import { performance } from 'node:perf_hooks'
import { AgentInvalidResponseError } from '../errors'
import { logEvent } from '../log'
import type { EventSink } from '../log'
import { agentStatusOf, clampWait } from './client'

/** The plugin's logger (lib/log.ts). */
export type WatchLogger = EventSink

export interface WatchFetchQuery {
  /** 0 for a non-blocking read (the first poll, the one after a failure, or after the index went backwards or was invalid). */
  index: number
  waitMs: number
  signal: AbortSignal
}

export interface WatchOptions<T> {
  /** `leaf`, `roots`, `intentions`, ...: the `watch` field of every log line. */
  name: string
  /** One poll: resolve with the answer's X-Consul-Index and value, reject on any failure. */
  fetch: (q: WatchFetchQuery) => Promise<{ index: number | null, value: T }>
  /**
   * Called for each new value (first answer, or a changed index). If it throws, the value is
   * rejected: the last good value stays, the error is logged, and polling continues from the new
   * index, so the next change (a fix) is picked up; the rejected value itself is not retried.
   */
  accept?: (value: T) => void
  /**
   * Whether an answer at an unchanged index still carries a different value. Consul reports an
   * unchanged index for timeouts, but an agent restarted without its state (dev mode, lost data
   * dir) can reissue different content under an index it used before. Default: never.
   */
  differs?: (previous: T, next: T) => boolean
  /**
   * Whether an answer under a higher index carries the value last accepted. Consul raises some
   * indexes for writes elsewhere (the intention match follows every config entry of the cluster):
   * such an answer moves the index and changes nothing else. Default: equal as JSON.
   */
  same?: (previous: T, next: T) => boolean
  /** How long the agent may hold each poll. Default 300 000; at most 600 000. */
  waitMs?: number
  /** Token bucket on polls that follow a success: `burst` at once, then one per `minIntervalMs`. Defaults 1 000 and 5. */
  minIntervalMs?: number
  burst?: number
  /** Full-jitter exponential backoff after a failed poll. Defaults 200 ms → 30 s. */
  backoff?: { initialMs: number, maxMs: number }
  log: WatchLogger
  /** Source of jitter in [0, 1); tests pin it. */
  random?: () => number
}

// Polls go to the local agent and return only on change: a burst of 5, then one a second, keeps
// a change prompt and bounds the load under churn.
const DEFAULTS = { minIntervalMs: 1_000, burst: 5, backoff: { initialMs: 200, maxMs: 30_000 } }

type Failure = 'fetch' | 'rejected'

export class BlockingWatch<T> {
  readonly name: string
  readonly #fetch: WatchOptions<T>['fetch']
  readonly #accept: (value: T) => void
  readonly #differs: (previous: T, next: T) => boolean
  readonly #same: (previous: T, next: T) => boolean
  readonly #log: WatchLogger
  readonly #waitMs: number
  readonly #backoff: { initialMs: number, maxMs: number }
  readonly #random: () => number
  readonly #bucket: TokenBucket
  readonly #listeners = new Set<(value: T) => void>()
  readonly #failureListeners = new Set<(err: Error) => void>()

  #state: 'idle' | 'running' | 'stopped' = 'idle'
  #inflight: AbortController | null = null
  #wake: (() => void) | null = null
  #value: T | undefined = undefined
  #index = 0
  #lastSuccess: Date | null = null
  #lastError: Error | null = null
  #failures = 0
  /** The next poll re-reads without blocking: set by a failed poll, cleared by any answer. */
  #reread = false
  /** The last failed poll was answered by the agent with a server error (5xx), not a transport failure. */
  #serverError = false
  /** The rejection of the value at the current index, kept until a later value is accepted. */
  #rejection: Error | null = null
  /** Key of the failure last logged at warn/error; repeats of it go to debug. */
  #loggedCause: string | null = null
  readonly #ready: Deferred<T>

  constructor (opts: WatchOptions<T>) {
    this.name = opts.name
    this.#fetch = opts.fetch
    this.#accept = opts.accept ?? (() => {})
    this.#differs = opts.differs ?? (() => false)
    this.#same = opts.same ?? sameJson
    this.#log = opts.log
    this.#waitMs = clampWait(opts.waitMs)
    this.#backoff = opts.backoff ?? DEFAULTS.backoff
    this.#random = opts.random ?? Math.random
    this.#bucket = new TokenBucket(opts.burst ?? DEFAULTS.burst, opts.minIntervalMs ?? DEFAULTS.minIntervalMs)
    this.#ready = deferred()
  }

  /** The last accepted value. */
  get value (): T | undefined { return this.#value }
  /** The index the next poll blocks on; 0 before the first answer. */
  get index (): number { return this.#index }
  /** When the agent last answered successfully (even without a change). */
  get lastSuccess (): Date | null { return this.#lastSuccess }
  /** The current problem: the last failed poll, or the rejection of the newest value; null when healthy. */
  get lastError (): Error | null { return this.#lastError }
  /** Consecutive failed polls (drives the backoff). */
  get failures (): number { return this.#failures }

  start (): void {
    if (this.#state !== 'idle') return
    this.#state = 'running'
    this.#run().catch((err: unknown) => {
      // Only a throwing logger gets here; stop rather than spin, and keep the error visible.
      this.#lastError = toError(err)
      this.stop()
    })
  }

  stop (): void {
    if (this.#state === 'stopped') return
    this.#state = 'stopped'
    this.#inflight?.abort()
    this.#wake?.()
    const cause = this.#lastError
    this.#ready.reject(new Error(`watch ${this.name} stopped before its first value`, cause === null ? undefined : { cause }))
  }

  /** Resolves with the first accepted value; rejects only if the watch is stopped first. */
  ready (): Promise<T> {
    return this.#ready.promise
  }

  on (event: 'change', fn: (value: T) => void): this {
    if (event !== 'change') throw new TypeError(`unknown event "${String(event)}"`)
    this.#listeners.add(fn)
    return this
  }

  off (event: 'change', fn: (value: T) => void): this {
    if (event === 'change') this.#listeners.delete(fn)
    return this
  }

  /** `fn` runs on every failed poll and every rejected value, with the error. */
  onFailure (fn: (err: Error) => void): this {
    this.#failureListeners.add(fn)
    return this
  }

  async #run (): Promise<void> {
    let delayMs = 0
    while (this.#state === 'running') {
      // After a failure the backoff alone spaces polls; after a success the token bucket does.
      await this.#sleep(delayMs > 0 ? delayMs : this.#bucket.take())
      if (this.#state !== 'running') return

      const controller = new AbortController()
      this.#inflight = controller
      let answer: { index: number | null, value: T }
      try {
        // After a failure the agent may have restarted without its state, with lower indexes: a
        // blocking read at our index would then hang for the whole wait. Re-read without blocking.
        const index = this.#reread ? 0 : this.#index
        answer = await this.#fetch({ index, waitMs: this.#waitMs, signal: controller.signal })
      } catch (err) {
        if (this.#state !== 'running') return
        delayMs = this.#fetchFailed(toError(err))
        continue
      } finally {
        this.#inflight = null
      }
      if (this.#state !== 'running') return
      const reread = this.#reread
      this.#reread = false
      delayMs = this.#answered(answer.index, answer.value, reread)
    }
  }

  /** Returns the delay before the next poll. `reread`: the answer to the re-read after a failure. */
  #answered (index: number | null, value: T, reread: boolean): number {
    if (index === null || !Number.isSafeInteger(index) || index < 1) {
      // The agent never sends 0 (it rewrites it to 1); an index we cannot order by makes blocking
      // impossible, so distrust the answer and start again with a non-blocking read.
      this.#index = 0
      return this.#fetchFailed(new AgentInvalidResponseError(`the ${this.name} query`,
        `X-Consul-Index is ${index === null ? 'missing or not an integer' : String(index)}; expected an integer of at least 1`))
    }
    const repeated = this.#value !== undefined && index === this.#index && !this.#differs(this.#value, value)
    if (reread && this.#serverError && repeated && this.#rejection === null) {
      // A Consul agent that cannot reach its servers answers a read without an index from its cache,
      // while its blocking queries fail (500): the last value again proves nothing. The failure stands
      // (no recovery line, no new lastSuccess, the backoff keeps growing) until a blocking query
      // succeeds or the index moves. After a transport failure or a 4xx, any answer is a recovery.
      return 0
    }
    this.#lastSuccess = new Date()
    this.#failures = 0
    if (index < this.#index) {
      // Snapshot restore or a new cluster: the old index means nothing now; re-read from scratch.
      logEvent(this.#log, 'info', 'watch-index-reset', { watch: this.name, index, previousIndex: this.#index }, `${this.name}: Consul index went backwards; re-reading`)
      this.#index = 0
      this.#settle()
      return 0
    }
    if (index === this.#index && (this.#value === undefined || repeated)) {
      this.#settle()
      return 0
    }
    if (index > this.#index && this.#value !== undefined && this.#same(this.#value, value)) {
      // Only the index moved, back to (or still at) the last good value: nothing to accept or announce.
      this.#index = index
      this.#rejection = null
      this.#settle()
      return 0
    }
    const previousIndex = this.#index
    this.#index = index
    try {
      this.#accept(value)
    } catch (err) {
      this.#rejection = toError(err)
      this.#failed('rejected', this.#rejection, { index, previousIndex })
      return 0
    }
    this.#value = value
    this.#rejection = null
    this.#settle()
    logEvent(this.#log, 'debug', 'watch-updated', { watch: this.name, index, previousIndex }, `${this.name}: new value`)
    this.#ready.resolve(value)
    for (const fn of this.#listeners) {
      try {
        fn(value)
      } catch (err) {
        logEvent(this.#log, 'error', 'listener-failed', { watch: this.name, listenerEvent: 'change' }, `${this.name}: change listener threw`, err)
      }
    }
    return 0
  }

  /** Back to health unless the current value is rejected; logs the recovery once. */
  #settle (): void {
    this.#lastError = this.#rejection
    if (this.#rejection === null && this.#loggedCause !== null) {
      this.#loggedCause = null
      logEvent(this.#log, 'info', 'watch-recovered', { watch: this.name, index: this.#index }, `${this.name}: recovered`)
    }
  }

  #fetchFailed (err: Error): number {
    this.#failures++
    this.#reread = true
    this.#serverError = (agentStatusOf(err) ?? 0) >= 500
    const ceiling = Math.min(this.#backoff.maxMs, this.#backoff.initialMs * 2 ** Math.min(this.#failures - 1, 30))
    const retryInMs = Math.floor(this.#random() * ceiling)
    this.#failed('fetch', err, { failures: this.#failures, retryInMs })
    return Math.max(retryInMs, 1)
  }

  #failed (kind: Failure, err: Error, fields: { index?: number, previousIndex?: number, failures?: number, retryInMs?: number }): void {
    this.#lastError = err
    for (const fn of this.#failureListeners) {
      try {
        fn(err)
      } catch (listenerErr) {
        logEvent(this.#log, 'error', 'listener-failed', { watch: this.name, listenerEvent: 'failure' }, `${this.name}: failure listener threw`, listenerErr)
      }
    }
    const cause = causeOf(kind, err)
    const event = kind === 'rejected' ? 'watch-rejected' : 'watch-failed'
    const line = { watch: this.name, index: this.#index, ...fields }
    if (cause === this.#loggedCause) {
      logEvent(this.#log, 'debug', event, line, `${this.name}: ${kind === 'rejected' ? 'value rejected again' : 'poll failed again'}`, err)
      return
    }
    this.#loggedCause = cause
    if (kind === 'rejected') {
      logEvent(this.#log, 'error', event, line, `${this.name}: new value rejected; keeping the last good one`, err)
    } else {
      logEvent(this.#log, needsOperator(err) ? 'error' : 'warn', event, line, `${this.name}: poll failed; keeping the last good value`, err)
    }
  }

  /** Resolves after `ms`, or at once when stop() calls #wake. */
  #sleep (ms: number): Promise<void> {
    if (ms <= 0) return Promise.resolve()
    return new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, ms)
      timer.unref()
      this.#wake = () => {
        clearTimeout(timer)
        resolve()
      }
    }).finally(() => { this.#wake = null })
  }
}

/** Errors that retrying will not fix: a malformed answer or a 4xx other than 404/429 (e.g. ACL 403). */
function needsOperator (err: Error): boolean {
  if (err instanceof AgentInvalidResponseError) return true
  const status = agentStatusOf(err)
  return status !== null && status >= 400 && status < 500 && status !== 404 && status !== 429
}

/** `burst` polls at once, then one per `intervalMs`: quick successive deliveries, bounded churn. */
class TokenBucket {
  readonly #burst: number
  readonly #intervalMs: number
  #tokens: number
  #at = performance.now()

  constructor (burst: number, intervalMs: number) {
    this.#burst = burst
    this.#intervalMs = intervalMs
    this.#tokens = burst
  }

  /** Takes a token; returns how long to wait for it. */
  take (): number {
    const now = performance.now()
    this.#tokens = Math.min(this.#burst, this.#tokens + (now - this.#at) / this.#intervalMs) - 1
    this.#at = now
    return this.#tokens >= 0 ? 0 : Math.ceil(-this.#tokens * this.#intervalMs)
  }
}

interface Deferred<T> { promise: Promise<T>, resolve: (v: T) => void, reject: (e: Error) => void }

function deferred<T> (): Deferred<T> {
  let resolveFn!: (v: T) => void
  let rejectFn!: (e: Error) => void
  const promise = new Promise<T>((resolve, reject) => { resolveFn = resolve; rejectFn = reject })
  // Nobody may be waiting on ready(); a rejection on stop() must not be reported as unhandled.
  promise.catch(() => {})
  return { promise, resolve: resolveFn, reject: rejectFn }
}

function sameJson (previous: unknown, next: unknown): boolean {
  return JSON.stringify(previous) === JSON.stringify(next)
}

function toError (err: unknown): Error {
  return err instanceof Error ? err : new Error(String(err))
}

/**
 * What makes two failures the same cause, for logging once: an agent's error answer by its status
 * (its body may carry a request id or a time), an unreachable agent by the transport's code (a
 * timeout names its wait, which differs between a poll and a re-read), anything else by its message.
 */
function causeOf (kind: Failure, err: Error): string {
  const code = (err as { code?: unknown }).code ?? err.name
  const status = agentStatusOf(err)
  if (status !== null) return `${kind}:${String(code)}:${status}`
  const transport = ((err as { cause?: { code?: unknown } }).cause)?.code
  if (typeof transport === 'string') return `${kind}:${String(code)}:${transport}`
  return `${kind}:${String(code)}:${err.message}`
}
