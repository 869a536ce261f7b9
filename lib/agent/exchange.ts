// One HTTP exchange with the agent, on two undici Pools to its one origin: the wire half of
// AgentClient (lib/agent/client.ts), which builds the request and reads the answer. Kept apart so
// that it can run either in the application's thread or on the agent worker thread
// (lib/agent/worker-transport.ts): its inputs and outputs are plain, structured-cloneable data.
import { Pool } from 'undici'
import type { AgentTlsConfig } from './config'

/** Error bodies are plain text; a few KiB is plenty and bounds what a broken agent can make us hold. */
const ERROR_BODY_BYTES = 16 * 1024
/** What the whole exchange may take beyond its timeout: a body's time once the headers are in. */
const BODY_GRACE_MS = 1_000

/** Where and how to connect: what both pools of one AgentClient share. */
export interface ExchangeTarget {
  readonly origin: string
  readonly socketPath: string | null
  readonly tls: AgentTlsConfig | null
  /** Upper bound of open connections of the short-call pool. */
  readonly connections: number
}

export interface ExchangeRequest {
  /** `long`: blocking queries, a connection each; `short`: everything else, never behind a poll. */
  readonly pool: 'short' | 'long'
  readonly method: string
  /** Path and query. */
  readonly path: string
  readonly headers: Record<string, string>
  readonly body: string | undefined
  /** Headers and body timeout. */
  readonly timeoutMs: number
  /** Largest 2xx body read; a larger one ends the exchange with `overflow`. */
  readonly maxBodyBytes: number
  /** A 404 is an answer without a body (its body is drained, not read). */
  readonly allow404: boolean
}

export interface ExchangeResponse {
  readonly status: number
  readonly headers: Record<string, string | string[] | undefined>
  /** The body as text: whole for a 2xx, its first ERROR_BODY_BYTES for an error, '' for an allowed 404. */
  readonly text: string
  /** The body was larger than the limit for its status; `text` holds its beginning. */
  readonly overflow: boolean
}

/** The two pools of one AgentClient, and the exchange over them. */
export class ExchangePools {
  readonly thread = 'main'
  /** Non-blocking calls: never queued behind a long poll. */
  readonly #short: Pool
  /** Blocking queries: one connection per parked poll. */
  readonly #long: Pool

  constructor (target: ExchangeTarget) {
    const connect = { ...target.tls, ...(target.socketPath === null ? {} : { socketPath: target.socketPath }) }
    this.#short = new Pool(target.origin, { connections: target.connections, pipelining: 1, connect })
    // No bound: the number of watches is the app's (targets it calls); a bound would park polls in a queue.
    this.#long = new Pool(target.origin, { pipelining: 1, connect })
  }

  /**
   * Sends one request and reads its answer; transport failures (refused, reset, timeouts,
   * aborts) reject with undici's or Node's own error.
   */
  async exchange (req: ExchangeRequest, signal: AbortSignal | undefined): Promise<ExchangeResponse> {
    // undici's timeouts bound each wait (for the headers, between two chunks): a body trickling in a
    // few bytes at a time would pass them for ever. The whole exchange gets the same bound, and a
    // second for the body (undici's own, more precise errors come first when they apply).
    const deadline = new AbortController()
    const onAbort = (): void => { deadline.abort(signal?.reason) }
    if (signal?.aborted === true) onAbort()
    else signal?.addEventListener('abort', onAbort, { once: true })
    const bound = req.timeoutMs + BODY_GRACE_MS
    const timer = setTimeout(() => { deadline.abort(overdue(bound)) }, bound)
    let res: ExchangeResponse
    try {
      res = await this.#exchange(req, deadline.signal)
    } catch (err) {
      // Reported as undici reports its own timeouts (a caller's abort, when first, is the reason instead).
      throw deadline.signal.reason instanceof OverdueError ? deadline.signal.reason : err
    } finally {
      clearTimeout(timer)
      signal?.removeEventListener('abort', onAbort)
    }
    return res
  }

  async #exchange (req: ExchangeRequest, signal: AbortSignal): Promise<ExchangeResponse> {
    const res = await (req.pool === 'long' ? this.#long : this.#short).request({
      method: req.method as 'GET',
      path: req.path,
      headers: req.headers,
      body: req.body,
      signal,
      headersTimeout: req.timeoutMs,
      bodyTimeout: req.timeoutMs
    })
    const status = res.statusCode
    if (status === 404 && req.allow404) {
      await res.body.dump()
      return { status, headers: res.headers, text: '', overflow: false }
    }
    const limit = status >= 200 && status < 300 ? req.maxBodyBytes : ERROR_BODY_BYTES
    const chunks: Buffer[] = []
    let size = 0
    let overflow = false
    for await (const chunk of res.body) {
      size += (chunk as Buffer).length
      if (size > limit) {
        // Destroying the stream aborts the request and closes its socket instead of draining it.
        res.body.destroy()
        chunks.push((chunk as Buffer).subarray(0, (chunk as Buffer).length - (size - limit)))
        overflow = true
        break
      }
      chunks.push(chunk as Buffer)
    }
    return { status, headers: res.headers, text: Buffer.concat(chunks).toString('utf8'), overflow }
  }

  /** Destroys open connections, failing in-flight long polls at once. */
  async destroy (): Promise<void> {
    await Promise.all([this.#short.destroy(), this.#long.destroy()])
  }
}

/** The whole exchange outlived its bound; `code` as undici's own timeouts, which AgentClient reports alike. */
class OverdueError extends Error {
  readonly code = 'UND_ERR_BODY_TIMEOUT'
}

function overdue (ms: number): OverdueError {
  return new OverdueError(`no complete answer within ${ms} ms`)
}
