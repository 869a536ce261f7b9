// A small mesh for tests: the dev agent, a Fastify service running the plugin, and real mTLS
// clients holding leaves the agent issued (or odd certificates minted on purpose).
import { generateKeyPairSync } from 'node:crypto'
import { Writable } from 'node:stream'
import Fastify from 'fastify'
import type { FastifyInstance, FastifyServerOptions } from 'fastify'
import { Agent, request } from 'undici'
import type { Dispatcher } from 'undici'
import consulNative, { httpsOptions } from '../../lib/index'
import type { ConsulNativeOptions, ConsulNativeStatus, HttpsOptionsInput } from '../../lib/index'
import { startDevAgent } from '../../lib/dev-agent/index'
import type { DevAgent, DevAgentOptions } from '../../lib/dev-agent/index'
import type { TlsMaterial } from '../../lib/tls'

/** A new EC P-256 key: `PUT /v1/connect/ca/configuration` with it rotates the CA, as in Consul. */
export function newCaKey (): string {
  return generateKeyPairSync('ec', { namedCurve: 'prime256v1' }).privateKey.export({ type: 'sec1', format: 'pem' }) as string
}

export interface Tap { teardown (fn: () => unknown): void }

export async function startAgent (t: Tap, options: DevAgentOptions = {}): Promise<DevAgent> {
  const agent = await startDevAgent(options)
  t.teardown(async () => await agent.close())
  return agent
}

export async function agentCall (agent: DevAgent, method: 'GET' | 'PUT' | 'POST' | 'DELETE', path: string, body?: unknown): Promise<{ status: number, body: any, headers: Record<string, unknown> }> {
  const res = await request(`${agent.address}${path}`, { method, body: body === undefined ? undefined : JSON.stringify(body) })
  const text = await res.body.text()
  let parsed: unknown = text
  try { parsed = JSON.parse(text) } catch {}
  return { status: res.statusCode, body: parsed, headers: res.headers }
}

/** Declares `service-defaults` with a protocol (L7 intentions need an HTTP-like one). */
export async function setProtocol (agent: DevAgent, service: string, protocol: string): Promise<void> {
  const res = await agentCall(agent, 'PUT', '/v1/config', { Kind: 'service-defaults', Name: service, Protocol: protocol })
  if (res.status !== 200) throw new Error(`service-defaults: ${res.status} ${JSON.stringify(res.body)}`)
}

/** Replaces the `service-intentions` entry of a destination. */
export async function setIntentions (agent: DevAgent, destination: string, sources: unknown[]): Promise<void> {
  const res = await agentCall(agent, 'PUT', '/v1/config', { Kind: 'service-intentions', Name: destination, Sources: sources })
  if (res.status !== 200) throw new Error(`service-intentions: ${res.status} ${JSON.stringify(res.body)}`)
}

export interface ServiceApp {
  app: FastifyInstance
  port: number
  origin: string
}

/** Starts a Fastify service with the plugin, a few routes, and listens on 127.0.0.1. */
export async function startService (t: Tap, agent: DevAgent, opts: {
  plugin?: Partial<ConsulNativeOptions>
  fastify?: FastifyServerOptions
  https?: HttpsOptionsInput
  http2?: boolean
  routes?: (app: FastifyInstance) => void
  host?: string
} = {}): Promise<ServiceApp> {
  const app = Fastify({
    ...(opts.fastify ?? {}),
    ...(opts.http2 === true ? { http2: true, https: httpsOptions({ allowHTTP1: true, ...opts.https }) } : { https: httpsOptions(opts.https) })
  } as FastifyServerOptions) as unknown as FastifyInstance
  t.teardown(async () => await app.close())
  await app.register(consulNative, { service: 'api', agent: { address: agent.address }, ...opts.plugin })
  if (opts.routes !== undefined) opts.routes(app)
  else defaultRoutes(app)
  await app.listen({ port: 0, host: opts.host ?? '127.0.0.1' })
  const address = app.server.address() as { port: number }
  return { app, port: address.port, origin: `https://127.0.0.1:${address.port}` }
}

export function defaultRoutes (app: FastifyInstance): void {
  app.get('/', async (request) => ({ hello: request.consulSource?.service ?? null }))
  app.get('/whoami', async (request) => ({ source: request.consulSource, decision: request.consulDecision }))
  app.get('/admin', async () => ({ admin: true }))
  app.get('/v1/items/:id', async (request) => ({ id: (request.params as { id: string }).id }))
  app.post('/v1/items', async () => ({ created: true }))
}

export interface Credentials { key: string, cert: string, ca: string[] }

/** A leaf for `service` as the agent issues it, plus the agent's roots to verify the server. */
export async function leafFor (agent: DevAgent, service: string): Promise<Credentials> {
  const leaf = await agentCall(agent, 'GET', `/v1/agent/connect/ca/leaf/${service}`)
  return { key: leaf.body.PrivateKeyPEM, cert: leaf.body.CertPEM, ca: await rootPems(agent) }
}

/** The TLS material a DynamicTls takes (lib/tls.ts), for `service`, as the agent issues it. */
export type LeafMaterial = TlsMaterial & { readonly serial: string }

export async function leafMaterial (agent: DevAgent, service: string): Promise<LeafMaterial> {
  const leaf = await agentCall(agent, 'GET', `/v1/agent/connect/ca/leaf/${service}`)
  const roots = await agentCall(agent, 'GET', '/v1/agent/connect/ca/roots')
  return {
    certPem: leaf.body.CertPEM,
    keyPem: leaf.body.PrivateKeyPEM,
    rootPems: roots.body.Roots.map((r: { RootCert: string }) => r.RootCert),
    trustDomain: roots.body.TrustDomain,
    serial: leaf.body.SerialNumber
  }
}

export async function rootPems (agent: DevAgent): Promise<string[]> {
  const roots = await agentCall(agent, 'GET', '/v1/agent/connect/ca/roots')
  return roots.body.Roots.map((root: { RootCert: string }) => root.RootCert)
}

/**
 * An mTLS client. Service leaves have no DNS SAN, so the server is checked by chain only here;
 * these tests are about the server's side of the handshake.
 */
export function mtlsClient (t: Tap, creds: Partial<Credentials> & { ca: string[] }, extra: Record<string, unknown> = {}): Agent {
  const client = new Agent({
    connect: { ...creds, checkServerIdentity: () => undefined, ...extra }
  })
  t.teardown(async () => await client.close())
  return client
}

/** One request; the path is sent exactly as given (no URL normalization on the client side). */
export async function get (dispatcher: Dispatcher, url: string, init: { method?: string, headers?: Record<string, string | string[]> } = {}): Promise<{ status: number, body: any }> {
  const { origin } = new URL(url)
  const path = url.slice(origin.length)
  const res = await dispatcher.request({ origin, path, method: (init.method ?? 'GET') as Dispatcher.HttpMethod, headers: init.headers })
  const text = await res.body.text()
  let parsed: unknown = text
  try { parsed = JSON.parse(text) } catch {}
  return { status: res.statusCode, body: parsed }
}

/** Resolves once `predicate(status)` holds, re-checked after every plugin update event. */
export async function waitForStatus (app: FastifyInstance, predicate: (status: ConsulNativeStatus) => boolean): Promise<ConsulNativeStatus> {
  const events = app.consulNative.events
  return await new Promise((resolve) => {
    const check = (): void => {
      const status = app.consulNative.status()
      if (!predicate(status)) return
      events.off('tls', check)
      events.off('intentions', check)
      resolve(status)
    }
    events.on('tls', check)
    events.on('intentions', check)
    check()
  })
}

/** A logger stream for Fastify (`logger: { stream }`) collecting the structured lines written to it. */
export function logLines (): { stream: Writable, lines: any[] } {
  const lines: any[] = []
  const stream = new Writable({
    write (chunk, _enc, done) {
      for (const line of String(chunk).split('\n')) if (line !== '') lines.push(JSON.parse(line))
      done()
    }
  })
  return { stream, lines }
}
