// A plain HTTP proxy in front of the dev agent, for tests that need to see, from the agent's side,
// which calls are in flight (a long poll is parked while the agent holds it), or to hold an answer
// the agent already gave (the agent acted; the client does not know yet).
import { EventEmitter, once } from 'node:events'
import http from 'node:http'
import type { AddressInfo } from 'node:net'
import { Agent, request } from 'undici'
import type { Dispatcher } from 'undici'

export interface Tap { teardown (fn: () => unknown): void }

export interface ProxiedCall {
  method: string
  /** Path and query, as the client sent them. */
  url: string
  /** Set once the agent answered. */
  status: number | null
}

export class AgentProxy extends EventEmitter {
  /** Calls the agent has not answered yet, in arrival order. */
  readonly inflight = new Set<ProxiedCall>()
  readonly calls: ProxiedCall[] = []
  /** Delays handing the agent's answer back to the client (the agent has already acted on the call). */
  holdAnswer: ((call: ProxiedCall) => Promise<void> | undefined) | null = null
  /** The URL forwarded to the agent (e.g. without Enterprise parameters a CE agent refuses). */
  rewrite: ((url: string) => string) | null = null
  /**
   * Answers a call itself instead of the agent (e.g. a real server's 403 for a token it does not
   * show), or with `'drop'` closes the connection unanswered (an agent restarting).
   */
  answer: ((call: ProxiedCall) => { status: number, body: string } | 'drop' | null) | null = null
  readonly #server: http.Server
  readonly #upstream = new Agent({ pipelining: 1 })
  readonly #responses = new Map<ProxiedCall, http.ServerResponse>()

  constructor (target: string) {
    super()
    this.#server = http.createServer((req, res) => {
      const call: ProxiedCall = { method: req.method as string, url: req.url as string, status: null }
      this.calls.push(call)
      this.#responses.set(call, res)
      res.on('close', () => this.#responses.delete(call))
      this.inflight.add(call)
      this.emit('call', call)
      const chunks: Buffer[] = []
      req.on('data', (c: Buffer) => chunks.push(c))
      req.on('end', () => {
        const own = this.answer?.(call) ?? null
        if (own === 'drop') {
          this.inflight.delete(call)
          res.socket?.destroy()
          return
        }
        if (own !== null) {
          call.status = own.status
          this.inflight.delete(call)
          res.writeHead(own.status, { 'content-type': 'text/plain; charset=utf-8' }).end(own.body)
          return
        }
        const headers = { ...req.headers }
        delete headers.host
        delete headers.connection
        request(`${target}${this.rewrite?.(call.url) ?? call.url}`, {
          method: call.method as Dispatcher.HttpMethod,
          headers,
          body: chunks.length === 0 ? undefined : Buffer.concat(chunks),
          dispatcher: this.#upstream
        }).then(async (up) => {
          const body = Buffer.from(await up.body.arrayBuffer())
          call.status = up.statusCode
          this.inflight.delete(call)
          this.emit('answered', call)
          // A client that gives up while the answer is held (its connection closes) is reported.
          res.on('close', () => { if (!res.writableFinished) this.emit('client-gone', call) })
          await this.holdAnswer?.(call)
          const out = { ...up.headers }
          delete out['transfer-encoding']
          delete out.connection
          out['content-length'] = String(body.length)
          res.writeHead(up.statusCode, out as http.OutgoingHttpHeaders)
          res.end(body)
        }).catch((err: Error) => {
          this.inflight.delete(call)
          res.destroy(err)
        })
      })
    })
  }

  get address (): string {
    return `http://127.0.0.1:${(this.#server.address() as AddressInfo).port}`
  }

  /** Cuts the client's connection of every unanswered call that matches. */
  cut (match: (call: ProxiedCall) => boolean): void {
    for (const [call, res] of this.#responses) if (match(call)) res.destroy()
  }

  /** Calls in flight at the agent whose URL matches. */
  parked (match: (call: ProxiedCall) => boolean): ProxiedCall[] {
    return [...this.inflight].filter(match)
  }

  /** Resolves once `predicate()` holds, re-checked on every call and answer. */
  async until (predicate: () => boolean): Promise<void> {
    if (predicate()) return
    await new Promise<void>((resolve) => {
      const check = (): void => {
        if (!predicate()) return
        this.off('call', check)
        this.off('answered', check)
        resolve()
      }
      this.on('call', check)
      this.on('answered', check)
    })
  }

  async start (): Promise<this> {
    this.#server.listen(0, '127.0.0.1')
    await once(this.#server, 'listening')
    return this
  }

  async close (): Promise<void> {
    this.#server.closeAllConnections()
    await new Promise((resolve) => this.#server.close(resolve))
    await this.#upstream.destroy()
  }
}

export async function startProxy (t: Tap, target: string): Promise<AgentProxy> {
  const proxy = await new AgentProxy(target).start()
  t.teardown(async () => await proxy.close())
  return proxy
}
