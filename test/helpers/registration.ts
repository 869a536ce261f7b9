// Helpers for the registration tests: an AgentClient that reports (and can hold) its requests,
// a logger whose calls can be awaited, direct calls to the dev agent, and an HTTPS health server.
import { EventEmitter, once } from 'node:events'
import https from 'node:https'
import type { AddressInfo } from 'node:net'
import type { FastifyBaseLogger } from 'fastify'
import { request } from 'undici'
import { AgentClient } from '../../lib/agent/client'
import type { AgentMethod, AgentRequestOptions, AgentResponse } from '../../lib/agent/client'
import { resolveAgentConfig } from '../../lib/agent/config'
import { startDevAgent } from '../../lib/dev-agent/index'
import type { DevAgent, DevAgentOptions } from '../../lib/dev-agent/index'
import { RecordingLogger } from './agent-fixtures'
import type { LogCall } from './agent-fixtures'

export interface Tap { teardown (fn: () => unknown): void }

export interface SpiedRequest { method: AgentMethod, path: string, opts: AgentRequestOptions }
export interface SpiedAnswer extends SpiedRequest { status: number | null, error: unknown }

/**
 * The real client, reporting every request (`'request'`) and its outcome (`'answer'`). `hold`
 * may delay a request before it is sent; `dropHash` hides `X-Consul-ContentHash`.
 */
export class SpyClient extends AgentClient {
  readonly events = new EventEmitter()
  readonly requests: SpiedRequest[] = []
  hold: ((req: SpiedRequest) => Promise<void> | undefined) | null = null
  dropHash = false

  override async request<T = unknown> (method: AgentMethod, path: string, opts: AgentRequestOptions = {}): Promise<AgentResponse<T>> {
    const req = { method, path, opts }
    this.requests.push(req)
    this.events.emit('request', req)
    await this.hold?.(req)
    try {
      const res = await super.request<T>(method, path, opts)
      this.events.emit('answer', { ...req, status: res.status, error: null })
      return this.dropHash ? { ...res, contentHash: null } : res
    } catch (error) {
      this.events.emit('answer', { ...req, status: null, error })
      throw error
    }
  }

  /** Resolves with the next `event` that satisfies `predicate`. */
  async next<E extends 'request' | 'answer'> (event: E, predicate: (x: E extends 'request' ? SpiedRequest : SpiedAnswer) => boolean): Promise<E extends 'request' ? SpiedRequest : SpiedAnswer> {
    return await new Promise((resolve) => {
      const listener = (x: E extends 'request' ? SpiedRequest : SpiedAnswer): void => {
        if (!predicate(x)) return
        this.events.off(event, listener)
        resolve(x)
      }
      this.events.on(event, listener)
    })
  }
}

/** A dev agent, closed when the test ends. */
export async function startAgent (t: Tap, options: DevAgentOptions = {}): Promise<DevAgent> {
  const agent = await startDevAgent(options)
  t.teardown(async () => await agent.close())
  return agent
}

export function clientFor (t: Tap, address: string, token?: string): SpyClient {
  const client = new SpyClient(resolveAgentConfig({ address, token }, {}))
  t.teardown(async () => await client.close())
  return client
}

/** A logger whose calls can be awaited; use `.logger` where a FastifyBaseLogger is expected. */
export class Logs extends RecordingLogger {
  get logger (): FastifyBaseLogger {
    return this as unknown as FastifyBaseLogger
  }

  /** Calls whose `consulNative.event` is `event` (at `level`, when given). */
  events (event: string, level?: LogCall['level']): LogCall[] {
    return this.calls.filter((c) => eventOf(c) === event && (level === undefined || c.level === level))
  }

  /** Resolves with the first call, past or future, whose event and level match (and `where`, when given). */
  async waitFor (event: string, level?: LogCall['level'], where: (c: LogCall) => boolean = () => true): Promise<LogCall> {
    const match = (c: LogCall): boolean => eventOf(c) === event && (level === undefined || c.level === level) && where(c)
    const past = this.calls.find(match)
    if (past !== undefined) return past
    return await new Promise((resolve) => {
      const listener = (c: LogCall): void => {
        if (!match(c)) return
        this.off('log', listener)
        resolve(c)
      }
      this.on('log', listener)
    })
  }
}

function eventOf (c: LogCall): unknown {
  return (c.obj.consulNative as { event?: unknown } | undefined)?.event
}

/** A direct call to the dev agent, optionally with a token. */
export async function call (agent: DevAgent, method: 'GET' | 'PUT', path: string, token?: string): Promise<{ status: number, body: any, headers: Record<string, unknown> }> {
  const res = await request(`${agent.address}${path}`, { method, headers: token === undefined ? {} : { 'x-consul-token': token } })
  const text = await res.body.text()
  let body: unknown = text
  try { body = JSON.parse(text) } catch {}
  return { status: res.statusCode, body, headers: res.headers }
}

/**
 * Blocks on `GET /v1/health/connect/<service>` (index-based) until `predicate` holds for the
 * answer, which it returns. No polling: each call returns only when the catalog changes.
 */
export async function waitForConnect (agent: DevAgent, service: string, predicate: (nodes: any[]) => boolean, opts: { passing?: boolean, token?: string } = {}): Promise<any[]> {
  let index = 0
  for (;;) {
    const res = await call(agent, 'GET', `/v1/health/connect/${service}?${opts.passing === true ? 'passing&' : ''}index=${index}&wait=5s`, opts.token)
    if (res.status !== 200) throw new Error(`health/connect: ${res.status} ${JSON.stringify(res.body)}`)
    if (predicate(res.body)) return res.body
    index = Number(res.headers['x-consul-index'])
  }
}

export const ids = (nodes: any[]): string[] => nodes.map((n) => n.Service.ID)

/** An HTTPS server with a certificate from the agent's CA, answering 200 on /health without asking for a client certificate. */
export async function healthServer (t: Tap, agent: DevAgent, host = '127.0.0.1'): Promise<{ port: number, hits: () => number }> {
  const { certPem, privateKeyPem } = await agent.ca.issueCertificate({ dnsNames: ['localhost'] })
  let hits = 0
  const server = https.createServer({ key: privateKeyPem, cert: certPem }, (req, res) => {
    if (req.url === '/health') hits++
    res.statusCode = req.url === '/health' ? 200 : 404
    res.end(req.url === '/health' ? 'ok' : 'not found')
  })
  server.listen(0, host)
  await once(server, 'listening')
  t.teardown(async () => {
    server.closeAllConnections()
    await new Promise((resolve) => server.close(resolve))
  })
  return { port: (server.address() as AddressInfo).port, hits: () => hits }
}
