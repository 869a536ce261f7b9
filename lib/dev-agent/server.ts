// The dev agent's HTTP server: routing, Consul's headers and error mapping, ACL tokens, the
// leaf cache, the CA configuration, and the endpoints of docs/semantics.md#agent-api on top of the CA, the
// catalog and the config-entry store.
import { createServer } from 'node:http'
import type { IncomingMessage, Server, ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import { createHash, randomUUID } from 'node:crypto'
import type { IndexedCARoots, IssuedCert } from '../agent/wire'
import { authorize, parseAuthorizeRequest } from './authorize'
import { ChangeHub, block, formatGoDuration, indexReady, parseBlockingParams, parseGoDurationNs, queryTimeout } from './blocking'
import { DevCertificateAuthority } from './ca'
import { CONSUL_VERSION, DevCatalog, unknownServiceMessage } from './catalog'
import { ConfigEntryStore, JWT_PROVIDER, MESH, PROXY_DEFAULTS, SERVICE_DEFAULTS, SERVICE_INTENTIONS, decodeConfigEntry, goQuote } from './config-entries'
import { pathUnescape } from './go'
import { DevAgentHttpError } from './http-error'
import { IntentionsApi, exactQuery } from './intentions'

export type Privilege = 'read' | 'write' | 'manage'

/** One request the dev agent served: HTTP method and path (no query), or `gRPC` and the full method name. */
export interface RequestLogEntry {
  readonly method: string
  readonly path: string
}

/** The request log keeps this many newest entries, so a long-running dev agent stays small. */
const REQUEST_LOG_LIMIT = 10_000
export type Policy = 'allow' | 'deny'

export interface DevAgentServerConfig {
  host: string
  port: number
  datacenter: string
  nodeName: string
  /** Initial `LeafCertTTL`, in milliseconds and as Go duration text. */
  leafTTLms: number
  leafTTLText: string
  defaultIntentionPolicy: Policy | undefined
  acl: { enabled: boolean, defaultPolicy: Policy, tokens: Record<string, Privilege> }
  /**
   * Upper bound of the random delay before cached leaves are re-issued after a CA rotation.
   * Consul spreads this over up to 30 s; a dev agent keeps it short.
   */
  rotationJitterMs: number
  random: () => number
}

/** Soft-expiry refreshes never run closer than this, so very short TTLs cannot spin. */
const MIN_REFRESH_MS = 1000
/** Retry delay after a failed background leaf refresh. */
const REFRESH_RETRY_MS = 5000
/** The leaf endpoint's default blocking wait (Consul's leafcert DefaultQueryTimeout). */
const LEAF_DEFAULT_WAIT_MS = 10 * 60_000
/** setTimeout's maximum delay; longer waits are chained. */
const MAX_TIMER_MS = 2 ** 31 - 1
const MAX_BODY_BYTES = 32 * 1024 * 1024
/** How long close() lets in-flight requests finish before cutting their connections. */
const CLOSE_GRACE_MS = 1000
const ANONYMOUS_ACCESSOR = '00000000-0000-0000-0000-000000000002'
const LEVEL: Record<Privilege, number> = { read: 1, write: 2, manage: 3 }
const DEFAULT_INTERMEDIATE_TTL = '8760h'
const DEFAULT_ROTATION_PERIOD = '2160h'
const HOUR_NS = 3_600_000_000_000n
const EC_BITS = [224, 256, 384, 521]
const RSA_BITS = [2048, 4096]

interface Reply {
  status?: number
  json?: unknown
  /** `?pretty`: indented JSON. */
  pretty?: boolean
  text?: string
  /** Raw body with its own content type (`?pem` roots). */
  raw?: { body: string, contentType: string }
  headers?: Record<string, string>
  /** Answered outside Consul's endpoint wrapper (its Index handler): no Consul headers. */
  unwrapped?: boolean
}

interface Ctx {
  method: string
  /** Percent-decoded path, as Go's `req.URL.Path`. */
  path: string
  /** The part of the path after a subtree route's prefix. */
  rest: string
  query: URLSearchParams
  headers: IncomingMessage['headers']
  token: string | undefined
  signal: AbortSignal
  body: () => Promise<string>
}

interface Route {
  path: string
  /** Subtree route (Go's ServeMux pattern ending in `/`). */
  prefix: boolean
  methods: string[]
  handler: (ctx: Ctx) => Promise<Reply> | Reply
}

interface LeafState {
  service: string
  datacenter: string
  topic: string
  cert: IssuedCert | null
  /** Active root when the cert was signed; a different active root means a rotation. */
  rootId: string
  fetchedAt: number
  softExpiry: number
  issuing: Promise<void> | null
  timer: NodeJS.Timeout | null
}

interface CAConfigState {
  config: Record<string, unknown>
  /** The PrivateKey the current root was made from, when one was configured. */
  privateKey: string
  createIndex: number
  modifyIndex: number
}

type GoField = 'string' | 'bool' | 'uint64' | 'object' | 'stringMap'

/** A JSON decode failure, worded like Go's encoding/json. */
class GoDecodeError extends Error {}

const GO_FIELD_TYPES: Record<GoField, string> = {
  string: 'string', bool: 'bool', uint64: 'uint64', object: 'map[string]interface {}', stringMap: 'map[string]string'
}

/** Go's name for the kind of a (non-null) JSON value in unmarshal errors. */
function jsonKind (value: unknown): string {
  if (Array.isArray(value)) return 'array'
  return typeof value === 'object' ? 'object' : typeof value === 'boolean' ? 'bool' : typeof value
}

/**
 * Parses a request body like Go's json.Decoder: an empty body is `EOF`, only the first value
 * counts (trailing text is ignored), and syntax errors are worded like Go's (approximately).
 */
function parseJson (text: string): unknown {
  if (text.trim() === '') throw new GoDecodeError('EOF')
  try {
    return JSON.parse(text)
  } catch (err) {
    const message = (err as Error).message
    const trailing = /after JSON at position (\d+)/.exec(message)
    if (trailing !== null) return JSON.parse(text.slice(0, Number(trailing[1])))
    if (/end of JSON input/.test(message)) throw new GoDecodeError('unexpected EOF')
    // V8 names either the offending position or the offending token.
    const found = /at position (\d+)|^Unexpected token '(.)'/.exec(message) as RegExpExecArray
    const at = found[1] === undefined ? found[2] : text[Number(found[1])]
    if (at === undefined) throw new GoDecodeError('unexpected EOF')
    throw new GoDecodeError(`invalid character '${at}' looking for beginning of value`)
  }
}

/**
 * Decodes into a Go struct as encoding/json with DisallowUnknownFields: keys match fields
 * case-insensitively, unknown keys and type mismatches fail, the first error in document order wins.
 */
function decodeGoStruct (value: unknown, typeName: string, fields: Record<string, GoField>): Record<string, unknown> {
  const out: Record<string, unknown> = {}
  if (value === null) return out
  if (typeof value !== 'object' || Array.isArray(value)) {
    throw new GoDecodeError(`json: cannot unmarshal ${jsonKind(value)} into Go value of type ${typeName}`)
  }
  const short = typeName.slice(typeName.indexOf('.') + 1)
  for (const [key, item] of Object.entries(value)) {
    const name = Object.hasOwn(fields, key) ? key : Object.keys(fields).find((field) => field.toLowerCase() === key.toLowerCase())
    if (name === undefined) throw new GoDecodeError(`json: unknown field ${goQuote(key)}`)
    if (item === null) continue
    const type = fields[name] as GoField
    const mismatch = (kind: string, goType: string): GoDecodeError =>
      new GoDecodeError(`json: cannot unmarshal ${kind} into Go struct field ${short}.${name} of type ${goType}`)
    const ok = type === 'string'
      ? typeof item === 'string'
      : type === 'bool'
        ? typeof item === 'boolean'
        : type === 'uint64'
          ? typeof item === 'number'
          : typeof item === 'object' && !Array.isArray(item)
    if (!ok) throw mismatch(jsonKind(item), GO_FIELD_TYPES[type])
    if (type === 'uint64' && (!Number.isInteger(item) || (item as number) < 0)) throw mismatch(`number ${String(item)}`, 'uint64')
    if (type === 'stringMap') {
      for (const entry of Object.values(item as Record<string, unknown>)) {
        if (entry !== null && typeof entry !== 'string') throw mismatch(jsonKind(entry), 'string')
      }
    }
    out[name] = item
  }
  return out
}

/** Go's `encoding/json` output: `<`, `>`, `&`, U+2028 and U+2029 escaped. */
function goJson (value: unknown, pretty: boolean): string {
  const text = pretty ? `${JSON.stringify(value, null, 4)}\n` : JSON.stringify(value)
  return text.replace(/[<>&\u2028\u2029]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`)
}

/** Go's url.PathUnescape; a malformed escape is a 400 as from Go's HTTP server. */
function unescapeRequestPath (text: string): string {
  if (/%(?![0-9A-Fa-f]{2})/.test(text)) throw new DevAgentHttpError(400, 'invalid URL escape')
  return pathUnescape(text)
}

function rfc3339 (date: Date): string {
  return date.toISOString().replace(/\.\d{3}Z$/, 'Z')
}

/** A stable AccessorID for a configured token (ACL messages name the accessor, never the secret). */
function accessorOf (token: string): string {
  const hex = createHash('sha256').update(token).digest('hex')
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20, 32)}`
}

/** The running dev agent's HTTP server and state. */
export class DevAgentServer {
  readonly ca: DevCertificateAuthority
  readonly hub: ChangeHub
  readonly config: ConfigEntryStore
  readonly catalog: DevCatalog
  readonly intentions: IntentionsApi
  readonly nodeId = randomUUID()
  /** Every request served, oldest first (bounded). */
  readonly requestLog: RequestLogEntry[] = []
  readonly #rootsListeners = new Set<() => void>()
  #cfg: DevAgentServerConfig
  #server: Server
  #routes: Route[]
  #leaves = new Map<string, LeafState>()
  #caConfig: CAConfigState
  #caQueue: Promise<void> = Promise.resolve()
  #rootsCache = { index: 0, at: 0 }
  #intentionsCache = new Map<string, { hash: string, at: number }>()
  #inflight = new Set<Promise<void>>()
  #closed: Promise<void> | null = null

  private constructor (cfg: DevAgentServerConfig, ca: DevCertificateAuthority, hub: ChangeHub) {
    this.#cfg = cfg
    this.ca = ca
    this.hub = hub
    this.config = new ConfigEntryStore({
      nextIndex: () => hub.nextIndex(),
      onChange: (kind, name) => {
        hub.notify(`config:${kind}/${name}`)
        hub.notify(`config:${kind}`)
        hub.notify('config')
      }
    })
    this.intentions = new IntentionsApi(this.config)
    this.catalog = new DevCatalog({
      nodeName: cfg.nodeName,
      datacenter: cfg.datacenter,
      nodeAddress: cfg.host === '0.0.0.0' || cfg.host === '::' || cfg.host.includes(':') ? '127.0.0.1' : cfg.host,
      nextIndex: () => hub.nextIndex(),
      onChange: (what) => {
        hub.notify(what)
        hub.notify('catalog')
      }
    })
    const caIndex = Math.max(...ca.roots().map((root) => root.ModifyIndex))
    this.#caConfig = {
      config: this.#defaultCAConfig(cfg.leafTTLText),
      privateKey: '',
      createIndex: caIndex,
      modifyIndex: caIndex
    }
    // Rotations started on the CA object directly (agent.ca.rotate()) still take an index and
    // wake the roots and leaf watchers.
    const rotate = ca.rotate.bind(ca)
    ca.rotate = async (opts = {}) => {
      const index = opts.index ?? hub.nextIndex()
      await rotate({ ...opts, index })
      this.#afterRotation()
    }
    this.#routes = this.#buildRoutes()
    this.#server = createServer((req, res) => this.#track(this.#handle(req, res)))
    this.#server.keepAliveTimeout = 30_000
  }

  static async start (cfg: DevAgentServerConfig): Promise<DevAgentServer> {
    const hub = new ChangeHub()
    const ca = await DevCertificateAuthority.create({ datacenter: cfg.datacenter, leafTTLms: cfg.leafTTLms, index: hub.nextIndex() })
    const agent = new DevAgentServer(cfg, ca, hub)
    await new Promise<void>((resolve, reject) => {
      agent.#server.once('error', reject)
      agent.#server.listen(cfg.port, cfg.host, () => {
        agent.#server.off('error', reject)
        resolve()
      })
    })
    return agent
  }

  get port (): number {
    return (this.#server.address() as AddressInfo).port
  }

  /** Releases every blocked query, stops timers and check runners, closes all sockets. */
  async close (): Promise<void> {
    this.#closed ??= (async () => {
      this.hub.close()
      for (const leaf of this.#leaves.values()) {
        if (leaf.timer !== null) clearTimeout(leaf.timer)
        leaf.timer = null
      }
      this.catalog.close()
      const closed = new Promise<void>((resolve) => this.#server.close(() => resolve()))
      this.#server.closeIdleConnections()
      // Released queries answer at once; a request stuck elsewhere (a client that never finishes
      // its body) must not hold close(), so the wait for answers is bounded.
      let timer: NodeJS.Timeout | undefined
      const bound = new Promise<void>((resolve) => { timer = setTimeout(resolve, CLOSE_GRACE_MS) })
      await Promise.race([Promise.allSettled([...this.#inflight]), bound])
      clearTimeout(timer)
      this.#server.closeAllConnections()
      await closed
    })()
    await this.#closed
  }

  #track (work: Promise<void>): void {
    this.#inflight.add(work)
    work.finally(() => this.#inflight.delete(work)).catch(() => undefined)
  }

  // -------------------------------------------------------------------------------------------
  // Request plumbing

  /** Records a request in `requestLog`. */
  logRequest (method: string, path: string): void {
    this.requestLog.push({ method, path })
    // Removes nothing until the limit is passed (a negative count is 0).
    this.requestLog.splice(0, this.requestLog.length - REQUEST_LOG_LIMIT)
  }

  /** `fn` runs after every CA rotation; returns its removal. */
  onRootsChange (fn: () => void): () => void {
    this.#rootsListeners.add(fn)
    return () => this.#rootsListeners.delete(fn)
  }

  /**
   * The ACL rule of the gRPC CA service: with ACLs on, the token must be known and may write
   * services (`name`, or any service when absent). Throws DevAgentHttpError 403 otherwise.
   */
  requireServiceWrite (token: string | undefined, name?: string): void {
    this.#require({ token } as Ctx, 'service', 'write', name)
  }

  async #handle (req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = req.url as string
    this.logRequest(req.method as string, url.includes('?') ? url.slice(0, url.indexOf('?')) : url)
    const abort = new AbortController()
    res.once('close', () => abort.abort())
    let reply: Reply
    try {
      reply = await this.#dispatch(req, abort.signal)
    } catch (err) {
      reply = err instanceof DevAgentHttpError
        ? { status: err.statusCode, text: err.message }
        : { status: 500, text: (err as Error).message }
    }
    // Drain what the handler did not read, so a keep-alive connection stays usable.
    req.resume()
    if (res.destroyed) return
    const headers: Record<string, string> = reply.unwrapped === true
      ? {}
      : {
          Vary: 'Accept-Encoding',
          // On every wrapped response: the agent's acl.default_policy (not default_intention_policy).
          'X-Consul-Default-Acl-Policy': this.#cfg.acl.defaultPolicy,
          ...reply.headers
        }
    let body = ''
    if (reply.json !== undefined) {
      headers['Content-Type'] = 'application/json'
      body = goJson(reply.json, reply.pretty === true)
    } else if (reply.raw !== undefined) {
      headers['Content-Type'] = reply.raw.contentType
      body = reply.raw.body
    } else if (reply.text !== undefined) {
      headers['Content-Type'] = 'text/plain; charset=utf-8'
      body = reply.text
    }
    headers['Content-Length'] = String(Buffer.byteLength(body))
    res.writeHead(reply.status ?? 200, headers)
    res.end(body)
  }

  async #dispatch (req: IncomingMessage, signal: AbortSignal): Promise<Reply> {
    const target = req.url as string
    const question = target.indexOf('?')
    const rawPath = question === -1 ? target : target.slice(0, question)
    const path = unescapeRequestPath(rawPath)
    const query = new URLSearchParams(question === -1 ? '' : target.slice(question + 1))
    // Go's ServeMux: an exact pattern, else the longest subtree pattern.
    let route = this.#routes.find((r) => !r.prefix && r.path === path)
    if (route === undefined) {
      route = this.#routes
        .filter((r) => r.prefix && path.startsWith(r.path))
        .sort((x, y) => y.path.length - x.path.length)[0]
    }
    // Consul's Index handler, which every unknown path reaches (agent/http.go).
    if (route === undefined) {
      const text = path.includes('/v1/')
        ? 'Invalid URL path: not a recognized HTTP API endpoint\n'
        : 'Invalid URL path: if attempting to use the HTTP API, ensure the path starts with \'/v1/\'\n'
      return { status: 404, text, unwrapped: true }
    }
    const method = req.method as string
    const allow = ['OPTIONS', ...route.methods].join(',')
    if (method === 'OPTIONS') return { headers: { Allow: allow } }
    if (!route.methods.includes(method)) return { status: 405, text: `method ${method} not allowed`, headers: { Allow: allow } }
    // What the servers answer goes to the datacenter asked for, which a lone agent has no path to
    // (agent/consul/rpc.go, structs.ErrNoDCPath); the agent's own endpoints ignore `dc`.
    const dc = query.get('dc') ?? ''
    if (dc !== '' && dc !== this.#cfg.datacenter && (!path.startsWith('/v1/agent/') || path.startsWith('/v1/agent/connect/ca/'))) {
      return { status: 500, text: 'No path to datacenter' }
    }
    // parseTokenFromHeaders: split on ' ', the scheme compared ignoring case, the first word of the rest.
    const bearer = /^bearer (.*)$/is.exec(req.headers.authorization ?? '')?.[1]?.trim().split(' ')[0]
    const headerToken = req.headers['x-consul-token']
    const token = (query.get('token') ?? '') !== ''
      ? query.get('token') as string
      : typeof headerToken === 'string' && headerToken !== '' ? headerToken : bearer
    const ctx: Ctx = {
      method,
      path,
      rest: route.prefix ? path.slice(route.path.length) : '',
      query,
      headers: req.headers,
      token,
      signal,
      body: async () => await readBody(req)
    }
    return { ...await route.handler(ctx), pretty: query.has('pretty') }
  }

  #buildRoutes (): Route[] {
    const r = (path: string, methods: string[], handler: Route['handler']): Route =>
      ({ path, prefix: path.endsWith('/'), methods, handler })
    return [
      r('/v1/agent/self', ['GET'], (ctx) => this.#agentSelf(ctx)),
      r('/v1/agent/services', ['GET'], (ctx) => this.#agentServices(ctx)),
      r('/v1/agent/service/register', ['PUT'], async (ctx) => await this.#register(ctx)),
      r('/v1/agent/service/deregister/', ['PUT'], (ctx) => this.#deregister(ctx)),
      r('/v1/agent/service/', ['GET'], async (ctx) => await this.#agentService(ctx)),
      r('/v1/agent/check/pass/', ['PUT'], (ctx) => this.#checkTTL(ctx, 'passing')),
      r('/v1/agent/check/warn/', ['PUT'], (ctx) => this.#checkTTL(ctx, 'warning')),
      r('/v1/agent/check/fail/', ['PUT'], (ctx) => this.#checkTTL(ctx, 'critical')),
      r('/v1/agent/check/update/', ['PUT'], async (ctx) => await this.#checkUpdate(ctx)),
      r('/v1/agent/connect/authorize', ['POST'], async (ctx) => await this.#authorize(ctx)),
      r('/v1/agent/connect/ca/roots', ['GET'], async (ctx) => await this.#roots(ctx, true)),
      r('/v1/agent/connect/ca/leaf/', ['GET'], async (ctx) => await this.#leaf(ctx)),
      r('/v1/connect/ca/roots', ['GET'], async (ctx) => await this.#roots(ctx, false)),
      r('/v1/connect/ca/configuration', ['GET', 'PUT'], async (ctx) => ctx.method === 'GET' ? this.#caConfigGet(ctx) : await this.#caConfigSet(ctx)),
      r('/v1/connect/intentions/match', ['GET'], async (ctx) => await this.#match(ctx)),
      r('/v1/connect/intentions', ['GET', 'POST'], async (ctx) => ctx.method === 'GET' ? await this.#intentionList(ctx) : await this.#intentionCreate(ctx)),
      r('/v1/connect/intentions/exact', ['GET', 'PUT', 'DELETE'], async (ctx) => await this.#intentionExact(ctx)),
      r('/v1/connect/intentions/check', ['GET'], (ctx) => this.#intentionCheck(ctx)),
      r('/v1/config', ['PUT'], async (ctx) => await this.#configApply(ctx)),
      r('/v1/config/', ['GET', 'DELETE'], async (ctx) => ctx.method === 'GET' ? await this.#configGet(ctx) : this.#configDelete(ctx)),
      r('/v1/health/connect/', ['GET'], async (ctx) => await this.#health(ctx, true)),
      r('/v1/health/service/', ['GET'], async (ctx) => await this.#health(ctx, false))
    ]
  }

  // -------------------------------------------------------------------------------------------
  // Shared request checks

  /** CE rejects namespaces and partitions, even `default` (docs/semantics.md#scopes). */
  #rejectEnterprise (ctx: Ctx): void {
    if ((ctx.headers['x-consul-namespace'] ?? '') !== '') {
      throw new DevAgentHttpError(400, 'Bad request: Invalid header: "X-Consul-Namespace" - Namespaces are a Consul Enterprise feature')
    }
    if ((ctx.query.get('ns') ?? '') !== '') {
      throw new DevAgentHttpError(400, 'Bad request: Invalid query parameter: "ns" - Namespaces are a Consul Enterprise feature')
    }
    if ((ctx.headers['x-consul-partition'] ?? '') !== '') {
      throw new DevAgentHttpError(400, 'Bad request: Invalid header: "X-Consul-Partition" - Partitions are a Consul Enterprise feature')
    }
    if ((ctx.query.get('partition') ?? '') !== '') {
      throw new DevAgentHttpError(400, 'Bad request: Invalid query parameter: "partition" - Partitions are a Consul Enterprise feature')
    }
  }

  /** Consul's parseConsistency; returns the effective consistency mode. */
  #consistency (ctx: Ctx): string {
    let stale = ctx.query.has('stale')
    const consistent = ctx.query.has('consistent')
    const maxStale = ctx.query.get('max_stale')
    if (maxStale !== null && maxStale !== '') {
      const ns = parseGoDurationNs(maxStale)
      if (ns === null) throw new DevAgentHttpError(400, `Invalid max_stale value ${goQuote(maxStale)}`)
      if (ns > 0n) stale = true
    }
    if (stale && consistent) throw new DevAgentHttpError(400, 'Cannot specify ?stale with ?consistent, conflicting semantics.')
    if (ctx.query.has('cached') && consistent) throw new DevAgentHttpError(400, 'Cannot specify ?cached with ?consistent, conflicting semantics.')
    return consistent ? 'consistent' : stale ? 'stale' : 'leader'
  }

  #blocking (ctx: Ctx): { index: number, timeoutMs: number } {
    const params = parseBlockingParams(ctx.query)
    return { index: params.index, timeoutMs: queryTimeout(params.waitMs, this.#cfg.random) }
  }

  /** `setMeta`: the index (never 0), known leader, last contact, and the query backend. */
  #meta (index: number, consistency?: string): Record<string, string> {
    const headers: Record<string, string> = {
      'X-Consul-Index': String(Math.max(1, index)),
      'X-Consul-Knownleader': 'true',
      'X-Consul-Lastcontact': '0',
      'X-Consul-Query-Backend': 'blocking-query'
    }
    if (consistency !== undefined) headers['X-Consul-Effective-Consistency'] = consistency
    return headers
  }

  /** Resolves the caller's privilege; unknown tokens are refused like Consul's "ACL not found". */
  #privilege (ctx: Ctx): { level: number, accessor: string, management: boolean } {
    const acl = this.#cfg.acl
    if (ctx.token === undefined) {
      return { level: acl.defaultPolicy === 'allow' ? LEVEL.manage : 0, accessor: ANONYMOUS_ACCESSOR, management: false }
    }
    const privilege = Object.hasOwn(acl.tokens, ctx.token) ? acl.tokens[ctx.token] : undefined
    if (privilege === undefined) throw new DevAgentHttpError(403, 'ACL not found')
    return { level: LEVEL[privilege], accessor: accessorOf(ctx.token), management: privilege === 'manage' }
  }

  /**
   * Checks the caller's token when ACLs are on: `read` needs any token privilege, `write` needs
   * write, and operator writes need a management token. Returns whether the token is a management one.
   */
  #require (ctx: Ctx, resource: string, access: 'read' | 'write', name?: string): boolean {
    if (!this.#cfg.acl.enabled) return true
    const caller = this.#privilege(ctx)
    const needed = access === 'read' ? LEVEL.read : resource === 'operator' || resource === 'mesh' ? LEVEL.manage : LEVEL.write
    if (caller.level < needed) {
      const on = name === undefined ? '' : ` on ${goQuote(name)}`
      throw new DevAgentHttpError(403, `Permission denied: token with AccessorID '${caller.accessor}' lacks permission '${resource}:${access}'${on}`)
    }
    return caller.management
  }

  // -------------------------------------------------------------------------------------------
  // CA roots and leaves

  #rootsBody (): { index: number, body: IndexedCARoots } {
    const roots = this.ca.roots()
    return {
      index: Math.max(...roots.map((root) => root.ModifyIndex)),
      body: { ActiveRootID: this.ca.activeRootId(), TrustDomain: this.ca.trustDomain, Roots: roots }
    }
  }

  async #roots (ctx: Ctx, agentCache: boolean): Promise<Reply> {
    const consistency = this.#consistency(ctx)
    const { index, timeoutMs } = this.#blocking(ctx)
    const result = await block({
      hub: this.hub, topics: ['roots'], timeoutMs, signal: ctx.signal, run: () => this.#rootsBody(), ready: indexReady(index)
    })
    // The agent endpoint is served from the agent cache (X-Cache, no consistency header); the
    // server endpoint reports its consistency mode.
    const headers = this.#meta(result.index, agentCache ? undefined : consistency)
    if (agentCache) Object.assign(headers, this.#cacheHeaders(this.#rootsCache, result.index))
    if (!agentCache && ctx.query.has('pem')) {
      const pem = result.body.Roots.map((root) => root.RootCert + (root.IntermediateCerts ?? []).join('')).join('')
      return { raw: { body: pem, contentType: 'application/pem-certificate-chain' }, headers }
    }
    return { json: result.body, headers }
  }

  /** X-Cache/Age for a cached value identified by `index`: MISS the first time, then HIT. */
  #cacheHeaders (cache: { index: number, at: number }, index: number): Record<string, string> {
    const now = Date.now()
    if (cache.index !== index) {
      cache.index = index
      cache.at = now
      return { 'X-Cache': 'MISS' }
    }
    return { 'X-Cache': 'HIT', Age: String(Math.floor((now - cache.at) / 1000)) }
  }

  #leafState (service: string, datacenter: string): LeafState {
    const key = `${service}\u0000${datacenter}`
    let leaf = this.#leaves.get(key)
    if (leaf === undefined) {
      leaf = { service, datacenter, topic: `leaf:${key}`, cert: null, rootId: '', fetchedAt: 0, softExpiry: 0, issuing: null, timer: null }
      this.#leaves.set(key, leaf)
    }
    return leaf
  }

  /** Signs a new leaf (one at a time per service and datacenter) and wakes its watchers. */
  async #issue (leaf: LeafState): Promise<void> {
    if (leaf.issuing === null) {
      leaf.issuing = (async () => {
        const rootId = this.ca.activeRootId()
        const signed = await this.ca.signLeaf(leaf.service, { datacenter: leaf.datacenter })
        const index = this.hub.nextIndex()
        leaf.cert = {
          SerialNumber: signed.serialNumber,
          CertPEM: signed.certPem,
          PrivateKeyPEM: signed.privateKeyPem,
          Service: leaf.service,
          ServiceURI: signed.uri,
          ValidAfter: rfc3339(signed.validAfter),
          ValidBefore: rfc3339(signed.validBefore),
          CreateIndex: index,
          ModifyIndex: index
        }
        leaf.rootId = rootId
        leaf.fetchedAt = Date.now()
        // Consul renews at a random point between 60% and 90% of the lifetime.
        const after = signed.validAfter.getTime()
        const lifetime = signed.validBefore.getTime() - after
        leaf.softExpiry = after + lifetime * (0.6 + 0.3 * this.#cfg.random())
        this.#schedule(leaf, leaf.softExpiry - Date.now(), 'expiry')
        this.hub.notify(leaf.topic)
      })().finally(() => { leaf.issuing = null })
    }
    await leaf.issuing
  }

  #schedule (leaf: LeafState, delayMs: number, reason: 'expiry' | 'rotation'): void {
    if (leaf.timer !== null) clearTimeout(leaf.timer)
    if (this.#closed !== null) return
    const delay = reason === 'expiry' ? Math.max(MIN_REFRESH_MS, delayMs) : delayMs
    leaf.timer = setTimeout(() => {
      leaf.timer = null
      if (delay > MAX_TIMER_MS) {
        this.#schedule(leaf, delay - MAX_TIMER_MS, reason)
      } else {
        this.#issue(leaf).catch(() => this.#schedule(leaf, REFRESH_RETRY_MS, 'rotation'))
      }
    }, Math.min(delay, MAX_TIMER_MS))
    leaf.timer.unref()
  }

  #afterRotation (): void {
    this.hub.notify('roots')
    for (const fn of this.#rootsListeners) fn()
    // Consul re-issues leaves within a random 0-30 s of a rotation; the dev agent uses a short window.
    for (const leaf of this.#leaves.values()) {
      if (leaf.cert !== null) this.#schedule(leaf, this.#cfg.random() * this.#cfg.rotationJitterMs, 'rotation')
    }
  }

  async #leaf (ctx: Ctx): Promise<Reply> {
    const service = ctx.rest
    if (service === '') throw new DevAgentHttpError(400, 'Missing service name')
    this.#rejectEnterprise(ctx)
    this.#consistency(ctx)
    // The leaf cache's own rule: 10 minutes by default, an explicit wait is taken as given, no jitter.
    const { index, waitMs } = parseBlockingParams(ctx.query)
    const timeoutMs = waitMs === undefined || waitMs <= 0 ? LEAF_DEFAULT_WAIT_MS : Math.min(waitMs, MAX_TIMER_MS)
    this.#require(ctx, 'service', 'write', service)
    const leaf = this.#leafState(service, this.#cfg.datacenter)
    let miss = false
    const result = await block({
      hub: this.hub,
      topics: [leaf.topic],
      timeoutMs,
      signal: ctx.signal,
      run: async () => {
        // Without an index the agent revalidates: a missing cert, one past its refresh point or
        // one from a rotated-out root is replaced before answering.
        const stale = leaf.cert === null ||
          (index === 0 && (leaf.rootId !== this.ca.activeRootId() || Date.now() >= leaf.softExpiry))
        if (stale) {
          await this.#issue(leaf)
          miss = true
        }
        const cert = leaf.cert as IssuedCert
        return { index: cert.ModifyIndex, cert }
      },
      ready: indexReady(index)
    })
    // No setMeta on this endpoint: the index and the cache headers only.
    const headers: Record<string, string> = { 'X-Consul-Index': String(result.index) }
    if (miss) headers['X-Cache'] = 'MISS'
    else Object.assign(headers, { 'X-Cache': 'HIT', Age: String(Math.floor((Date.now() - leaf.fetchedAt) / 1000)) })
    return { json: result.cert, headers }
  }

  // -------------------------------------------------------------------------------------------
  // CA configuration

  #defaultCAConfig (leafTTL: string): Record<string, unknown> {
    return {
      IntermediateCertTTL: DEFAULT_INTERMEDIATE_TTL,
      LeafCertTTL: leafTTL,
      PrivateKeyBits: 256,
      PrivateKeyType: 'ec',
      RotationPeriod: DEFAULT_ROTATION_PERIOD
    }
  }

  #caConfigGet (ctx: Ctx): Reply {
    this.#require(ctx, 'operator', 'write')
    const state = this.#caConfig
    // Go marshals the Config map with its keys sorted.
    const config = Object.fromEntries(Object.entries(state.config).sort(([a], [b]) => a < b ? -1 : 1))
    return {
      json: { Provider: 'consul', Config: config, State: null, ForceWithoutCrossSigning: false, CreateIndex: state.createIndex, ModifyIndex: state.modifyIndex }
    }
  }

  async #caConfigSet (ctx: Ctx): Promise<Reply> {
    const text = await ctx.body()
    let args: Record<string, unknown>
    try {
      args = decodeGoStruct(parseJson(text), 'structs.CAConfiguration', {
        Provider: 'string', Config: 'object', State: 'stringMap', ForceWithoutCrossSigning: 'bool', CreateIndex: 'uint64', ModifyIndex: 'uint64'
      })
    } catch (err) {
      throw new DevAgentHttpError(400, `Request decode failed: ${(err as Error).message}`)
    }
    this.#require(ctx, 'operator', 'write')
    if (Object.keys((args.State as Record<string, string> | undefined) ?? {}).length > 0) {
      throw new DevAgentHttpError(400, 'Provider State is read-only. It must be omitted or identical to the current value')
    }
    const provider = (args.Provider as string | undefined) ?? ''
    if (provider !== '' && provider !== 'consul') throw new DevAgentHttpError(500, `unknown CA provider ${goQuote(provider)}`)
    const raw = (args.Config as Record<string, unknown> | undefined) ?? {}
    const parsed = parseConsulCAConfig(raw)
    // Configurations run one at a time, so rotations keep their order.
    const run = this.#caQueue.then(async () => {
      const index = this.hub.nextIndex()
      if (parsed.privateKey !== '' && parsed.privateKey !== this.#caConfig.privateKey) {
        try {
          await this.ca.rotate({ privateKeyPem: parsed.privateKey, index })
        } catch (err) {
          throw new DevAgentHttpError(500, `error configuring provider: ${(err as Error).message}`)
        }
      }
      this.ca.leafTTLms = parsed.leafTTLms
      this.#caConfig = {
        config: { ...this.#defaultCAConfig(String(raw.LeafCertTTL ?? '72h')), ...raw },
        privateKey: parsed.privateKey,
        createIndex: this.#caConfig.createIndex,
        modifyIndex: index
      }
    })
    this.#caQueue = run.catch(() => undefined)
    await run
    return {}
  }

  // -------------------------------------------------------------------------------------------
  // Intentions and config entries

  async #match (ctx: Ctx): Promise<Reply> {
    this.#rejectEnterprise(ctx)
    const consistency = this.#consistency(ctx)
    const { index, timeoutMs } = this.#blocking(ctx)
    const by = ctx.query.getAll('by')
    const names = ctx.query.getAll('name')
    this.config.match(by, names) // parameter errors (500) come before the ACL check
    for (const name of names) this.#require(ctx, 'intention', 'read', name)
    const result = await block({
      hub: this.hub,
      topics: ['config'],
      timeoutMs,
      signal: ctx.signal,
      run: () => {
        const value = this.config.match(by, names)
        return { index: this.config.tableIndex, value, hash: JSON.stringify(value) }
      },
      ready: indexReady(index)
    })
    const headers = this.#meta(result.index, consistency)
    if (ctx.query.has('cached')) Object.assign(headers, this.#intentionCacheHeaders(`match:${by.join(',')}:${names.join(',')}`, result.hash))
    return { json: result.value, headers }
  }

  #intentionCacheHeaders (key: string, hash: string): Record<string, string> {
    const now = Date.now()
    const cached = this.#intentionsCache.get(key)
    if (cached === undefined) {
      this.#intentionsCache.set(key, { hash, at: now })
      return { 'X-Cache': 'MISS' }
    }
    // The agent cache refreshes in the background, so a changed value is still a hit.
    if (cached.hash !== hash) this.#intentionsCache.set(key, { hash, at: now })
    return { 'X-Cache': 'HIT', Age: String(Math.floor((now - (this.#intentionsCache.get(key) as { at: number }).at) / 1000)) }
  }

  // -------------------------------------------------------------------------------------------
  // Intentions by name (docs/semantics.md#rollout-dev-agent-intentions)

  async #intentionList (ctx: Ctx): Promise<Reply> {
    this.#rejectEnterprise(ctx)
    const consistency = this.#consistency(ctx)
    const { index, timeoutMs } = this.#blocking(ctx)
    this.#require(ctx, 'intention', 'read')
    const result = await block({
      hub: this.hub,
      topics: ['config'],
      timeoutMs,
      signal: ctx.signal,
      run: () => ({ index: this.config.tableIndex, value: this.intentions.list() }),
      ready: indexReady(index)
    })
    return { json: result.value, headers: this.#meta(result.index, consistency) }
  }

  async #intentionCreate (ctx: Ctx): Promise<Reply> {
    this.#rejectEnterprise(ctx)
    const body = await this.#jsonBody(ctx, (message) => new DevAgentHttpError(500, `Failed to decode request body: ${message}`))
    return { json: this.intentions.create(body, (destination) => this.#require(ctx, 'intention', 'write', destination)) }
  }

  async #intentionExact (ctx: Ctx): Promise<Reply> {
    this.#rejectEnterprise(ctx)
    if (ctx.method === 'GET') {
      const consistency = this.#consistency(ctx)
      const { source, destination } = exactQuery(ctx.query, true)
      this.#require(ctx, 'intention', 'read', destination.name)
      return { json: this.intentions.get(source, destination), headers: this.#meta(this.config.tableIndex, consistency) }
    }
    const { source, destination } = exactQuery(ctx.query, false)
    const authorizeWrite = (name: string): void => { this.#require(ctx, 'intention', 'write', name) }
    if (ctx.method === 'DELETE') return { json: this.intentions.delete(source, destination, authorizeWrite) }
    const body = await this.#jsonBody(ctx, (message) => new DevAgentHttpError(400, `Request decode failed: ${message}`))
    return { json: this.intentions.put(source, destination, body, authorizeWrite) }
  }

  #intentionCheck (ctx: Ctx): Reply {
    this.#rejectEnterprise(ctx)
    const consistency = this.#consistency(ctx)
    const destination = ctx.query.get('destination')
    // Consul asks only service:read here: the answer says allowed or not, nothing about intentions.
    const management = this.#require(ctx, 'service', 'read', destination ?? undefined)
    const allowed = this.intentions.check(ctx.query, {
      defaultIntentionPolicy: this.#cfg.defaultIntentionPolicy,
      aclsEnabled: this.#cfg.acl.enabled,
      tokenDefaultAllow: management || this.#cfg.acl.defaultPolicy === 'allow'
    })
    return { json: allowed, headers: this.#meta(this.config.tableIndex, consistency) }
  }

  async #jsonBody (ctx: Ctx, fail: (message: string) => DevAgentHttpError): Promise<unknown> {
    try {
      return parseJson(await ctx.body())
    } catch (err) {
      throw fail((err as Error).message)
    }
  }

  async #authorize (ctx: Ctx): Promise<Reply> {
    this.#rejectEnterprise(ctx)
    const text = await ctx.body()
    let body: Record<string, unknown>
    try {
      body = decodeGoStruct(parseJson(text), 'structs.ConnectAuthorizeRequest', {
        Target: 'string', ClientCertURI: 'string', ClientCertSerial: 'string'
      })
    } catch (err) {
      throw new DevAgentHttpError(400, `Bad request: Request decode failed: ${(err as Error).message}`)
    }
    const target = (body.Target as string | undefined) ?? ''
    const caller = parseAuthorizeRequest(target, (body.ClientCertURI as string | undefined) ?? '')
    const management = this.#require(ctx, 'service', 'write', target)
    const intentions = this.config.destinationIntentions(target)
    const decision = authorize(caller, intentions, {
      defaultIntentionPolicy: this.#cfg.defaultIntentionPolicy,
      aclsEnabled: this.#cfg.acl.enabled,
      tokenDefaultAllow: management || this.#cfg.acl.defaultPolicy === 'allow'
    })
    return { json: decision, headers: this.#intentionCacheHeaders(`authorize:${target}`, JSON.stringify(intentions)) }
  }

  /** The ACL check of a config entry: intentions and service-defaults per name, the rest operator. */
  #requireConfig (ctx: Ctx, kind: string, name: string, access: 'read' | 'write'): void {
    if (kind === SERVICE_INTENTIONS) this.#require(ctx, 'intention', access, name)
    else if (kind === SERVICE_DEFAULTS) this.#require(ctx, 'service', access, name)
    // jwt-provider: mesh:write; read with mesh:read or any service:write (Consul's CanRead, so proxies can read them).
    else if (kind === JWT_PROVIDER) this.#require(ctx, 'mesh', access)
    // proxy-defaults and mesh are readable by anyone and written with operator:write.
    else if (access === 'write') this.#require(ctx, 'operator', 'write')
  }

  #canRead (ctx: Ctx, kind: string, name: string): boolean {
    try {
      this.#requireConfig(ctx, kind, name, 'read')
      return true
    } catch {
      return false
    }
  }

  async #configApply (ctx: Ctx): Promise<Reply> {
    const text = await ctx.body()
    let body: unknown
    try {
      body = parseJson(text)
    } catch (err) {
      throw new DevAgentHttpError(400, `Bad request: Request decoding failed: ${(err as Error).message}`)
    }
    this.#rejectEnterprise(ctx)
    const applied = this.config.apply(body, ctx.query.get('cas'), (kind, name) => this.#requireConfig(ctx, kind, name, 'write'))
    // A source written as a config entry has no LegacyID (Consul refuses one there).
    if (applied) {
      // Decoded again for its canonical kind and name (keys may be spelled `kind`, `name`, ...).
      const { kind, entry } = decodeConfigEntry(body)
      if (kind === SERVICE_INTENTIONS) this.intentions.forget(String(entry.Name))
    }
    return { json: applied }
  }

  async #configGet (ctx: Ctx): Promise<Reply> {
    this.#rejectEnterprise(ctx)
    const consistency = this.#consistency(ctx)
    const { index, timeoutMs } = this.#blocking(ctx)
    const slash = ctx.rest.indexOf('/')
    if (slash === -1) {
      const kind = ctx.rest
      const result = await block({
        hub: this.hub,
        topics: [kind === '' ? 'config' : `config:${kind}`],
        timeoutMs,
        signal: ctx.signal,
        run: () => ({ index: this.config.tableIndex, value: this.config.list(kind) }),
        ready: indexReady(index)
      })
      const visible = result.value.filter((entry) => this.#canRead(ctx, entry.Kind as string, (entry.Name ?? MESH) as string))
      return { json: visible, headers: this.#meta(result.index, consistency) }
    }
    const kind = ctx.rest.slice(0, slash)
    const name = ctx.rest.slice(slash + 1)
    this.config.get(kind, name) // an invalid kind fails before the ACL check
    this.#requireConfig(ctx, kind, name, 'read')
    const result = await block({
      hub: this.hub,
      topics: [`config:${kind}/${name}`],
      timeoutMs,
      signal: ctx.signal,
      run: () => ({ index: this.config.tableIndex, value: this.config.get(kind, name) }),
      ready: indexReady(index)
    })
    const headers = this.#meta(result.index, consistency)
    if (result.value === null) {
      return { status: 404, text: `Config entry not found for ${goQuote(kind)} / ${goQuote(name)}`, headers }
    }
    return { json: result.value, headers }
  }

  #configDelete (ctx: Ctx): Reply {
    const slash = ctx.rest.indexOf('/')
    if (slash === -1) throw new DevAgentHttpError(404, 'Must provide both a kind and name to delete')
    const kind = ctx.rest.slice(0, slash)
    const name = ctx.rest.slice(slash + 1)
    this.#rejectEnterprise(ctx)
    if ([SERVICE_INTENTIONS, SERVICE_DEFAULTS, PROXY_DEFAULTS, MESH, JWT_PROVIDER].includes(kind)) this.#requireConfig(ctx, kind, name, 'write')
    const deleted = this.config.delete(kind, name, ctx.query.get('cas'))
    if (kind === SERVICE_INTENTIONS && deleted !== false) this.intentions.forget(name)
    // A CAS delete answers whether it deleted; a plain delete answers {} (also for a missing entry).
    return { json: deleted === undefined ? {} : deleted }
  }

  // -------------------------------------------------------------------------------------------
  // Catalog endpoints (the catalog validates bodies and throws DevAgentHttpError)

  async #register (ctx: Ctx): Promise<Reply> {
    this.#rejectEnterprise(ctx)
    const text = await ctx.body()
    let body: unknown
    try {
      // The catalog decodes the definition; an empty body reaches it as undefined (Go's EOF).
      body = text.trim() === '' ? undefined : parseJson(text)
    } catch (err) {
      throw new DevAgentHttpError(400, `Request decode failed: ${(err as Error).message}`)
    }
    const name = typeof body === 'object' && body !== null ? (body as { Name?: unknown }).Name : undefined
    this.#require(ctx, 'service', 'write', typeof name === 'string' ? name : '')
    this.catalog.register(body, ctx.query.has('replace-existing-checks'))
    return {}
  }

  #deregister (ctx: Ctx): Reply {
    this.#rejectEnterprise(ctx)
    this.#require(ctx, 'service', 'write', ctx.rest)
    this.catalog.deregister(ctx.rest)
    return {}
  }

  async #agentService (ctx: Ctx): Promise<Reply> {
    this.#rejectEnterprise(ctx)
    const id = ctx.rest
    // Hash-based blocking (docs/semantics.md#hash-blocking): `hash` plus `wait`; the index is not used.
    const { timeoutMs } = this.#blocking(ctx)
    const hash = ctx.query.get('hash') ?? ''
    const result = await block({
      hub: this.hub,
      topics: ['services'],
      timeoutMs,
      signal: ctx.signal,
      run: () => this.catalog.service(id),
      ready: (current) => hash === '' || current === null || current.hash !== hash
    })
    if (result === null) throw new DevAgentHttpError(404, unknownServiceMessage(id))
    this.#require(ctx, 'service', 'read', (result.body as { Service: string }).Service)
    return { json: result.body, headers: { 'X-Consul-Contenthash': result.hash } }
  }

  #agentServices (ctx: Ctx): Reply {
    this.#rejectEnterprise(ctx)
    this.#require(ctx, 'service', 'read')
    return { json: this.catalog.services() }
  }

  #checkTTL (ctx: Ctx, status: 'passing' | 'warning' | 'critical'): Reply {
    this.#rejectEnterprise(ctx)
    this.#require(ctx, 'node', 'write', this.#cfg.nodeName)
    this.catalog.updateCheck(ctx.rest, status, ctx.query.get('note') ?? '')
    return {}
  }

  async #checkUpdate (ctx: Ctx): Promise<Reply> {
    this.#rejectEnterprise(ctx)
    const text = await ctx.body()
    let update: Record<string, unknown>
    try {
      update = decodeGoStruct(parseJson(text), 'agent.checkUpdate', { Status: 'string', Output: 'string' })
    } catch (err) {
      throw new DevAgentHttpError(400, `Request decode failed: ${(err as Error).message}`)
    }
    const status = (update.Status as string | undefined) ?? ''
    if (status !== 'passing' && status !== 'warning' && status !== 'critical') {
      throw new DevAgentHttpError(400, `Invalid check status: '${status}'`)
    }
    this.#require(ctx, 'node', 'write', this.#cfg.nodeName)
    this.catalog.updateCheck(ctx.rest, status, (update.Output as string | undefined) ?? '')
    return {}
  }

  /** GET /v1/health/connect/:service (`connect`) or /v1/health/service/:service. */
  async #health (ctx: Ctx, connect: boolean): Promise<Reply> {
    const service = ctx.rest
    if (service === '') throw new DevAgentHttpError(400, 'Missing service name')
    this.#rejectEnterprise(ctx)
    const consistency = this.#consistency(ctx)
    const { index, timeoutMs } = this.#blocking(ctx)
    if (ctx.query.has('filter')) throw new DevAgentHttpError(400, 'the fastify-consul-native dev agent does not support ?filter')
    let passing = false
    if (ctx.query.has('passing')) {
      const value = ctx.query.get('passing') as string
      const parsed = value === '' ? true : parseGoBool(value)
      if (parsed === null) throw new DevAgentHttpError(400, 'Invalid value for ?passing')
      passing = parsed
    }
    this.#require(ctx, 'service', 'read', service)
    const tags = ctx.query.getAll('tag')
    const result = await block({
      hub: this.hub,
      topics: ['catalog'],
      timeoutMs,
      signal: ctx.signal,
      run: () => ({
        index: this.catalog.healthIndex(),
        value: (connect ? this.catalog.healthConnect(service, passing) : this.catalog.healthService(service, passing)).filter((node) => {
          const serviceTags: unknown[] = [(node as { Service: { Tags: unknown } }).Service.Tags].flat()
          return tags.every((tag) => serviceTags.includes(tag))
        })
      }),
      ready: indexReady(index)
    })
    return { json: result.value, headers: this.#meta(result.index, consistency) }
  }

  #agentSelf (ctx: Ctx): Reply {
    this.#require(ctx, 'agent', 'read', this.#cfg.nodeName)
    const cfg = this.#cfg
    return {
      json: {
        Config: {
          Datacenter: cfg.datacenter,
          PrimaryDatacenter: cfg.datacenter,
          NodeName: cfg.nodeName,
          NodeID: this.nodeId,
          Revision: 'devagent',
          Server: true,
          Version: CONSUL_VERSION,
          BuildDate: '2024-10-29T16:00:00Z'
        },
        DebugConfig: {
          ACLsEnabled: cfg.acl.enabled,
          ACLResolverSettings: {
            ACLDefaultPolicy: cfg.acl.defaultPolicy,
            Datacenter: cfg.datacenter,
            NodeName: cfg.nodeName
          },
          ConnectEnabled: true,
          Datacenter: cfg.datacenter,
          DefaultIntentionPolicy: cfg.defaultIntentionPolicy ?? '',
          DevMode: true,
          HTTPUseCache: true,
          NodeID: this.nodeId,
          NodeName: cfg.nodeName,
          PrimaryDatacenter: cfg.datacenter,
          ServerMode: true
        },
        Coord: { Vec: [0, 0, 0, 0, 0, 0, 0, 0], Error: 1.5, Adjustment: 0, Height: 0.00001 },
        Member: {
          Name: cfg.nodeName,
          Addr: '127.0.0.1',
          Port: 8301,
          Tags: { build: `${CONSUL_VERSION}:devagent`, dc: cfg.datacenter, role: 'consul', vsn: '2' },
          Status: 1,
          ProtocolMin: 1,
          ProtocolMax: 5,
          ProtocolCur: 2,
          DelegateMin: 2,
          DelegateMax: 5,
          DelegateCur: 4
        },
        Stats: {
          agent: { check_monitors: '0', check_ttls: '0', checks: '0', services: String(Object.keys(this.catalog.services()).length) },
          build: { prerelease: '', revision: 'devagent', version: CONSUL_VERSION },
          runtime: { arch: process.arch, os: process.platform, version: process.version },
          raft: { applied_index: String(this.hub.index), state: 'Leader' }
        },
        Meta: { 'consul-network-segment': '', 'consul-version': CONSUL_VERSION },
        xDS: { SupportedProxies: { envoy: [] }, Port: -1, Ports: { Plaintext: -1, TLS: -1 } }
      }
    }
  }
}

/** Go's strconv.ParseBool. */
function parseGoBool (text: string): boolean | null {
  if (['1', 't', 'T', 'TRUE', 'true', 'True'].includes(text)) return true
  if (['0', 'f', 'F', 'FALSE', 'false', 'False'].includes(text)) return false
  return null
}

/** Reads the body; past the limit the rest is drained and discarded, keeping the connection usable. */
async function readBody (req: IncomingMessage): Promise<string> {
  return await new Promise((resolve, reject) => {
    const chunks: Buffer[] = []
    let size = 0
    req.on('data', (chunk: Buffer) => {
      size += chunk.length
      if (size <= MAX_BODY_BYTES) chunks.push(chunk)
    })
    req.once('end', () => {
      if (size > MAX_BODY_BYTES) reject(new DevAgentHttpError(413, 'Request body too large'))
      else resolve(Buffer.concat(chunks).toString())
    })
    req.once('error', reject)
  })
}

/** Go duration text or a number of nanoseconds, as Consul's CA config decoder accepts. */
function caDuration (raw: Record<string, unknown>, key: string, fallback: bigint, errors: string[]): bigint {
  const value = raw[key]
  if (value === undefined || value === null) return fallback
  if (typeof value === 'number') return BigInt(Math.trunc(value))
  const ns = typeof value === 'string' ? parseGoDurationNs(value) : null
  if (ns === null) {
    errors.push(`error decoding '${key}': time: invalid duration ${goQuote(String(value))}`)
    return fallback
  }
  return ns
}

/** Consul's ParseConsulCAConfig and CommonCAProviderConfig.Validate, plus the dev CA's limits. */
function parseConsulCAConfig (raw: Record<string, unknown>): { leafTTLms: number, privateKey: string } {
  const errors: string[] = []
  const leaf = caDuration(raw, 'LeafCertTTL', 72n * HOUR_NS, errors)
  const intermediate = caDuration(raw, 'IntermediateCertTTL', 8760n * HOUR_NS, errors)
  caDuration(raw, 'RotationPeriod', 2160n * HOUR_NS, errors)
  caDuration(raw, 'RootCertTTL', 87600n * HOUR_NS, errors)
  if (errors.length > 0) {
    throw new DevAgentHttpError(500, `error decoding config: ${errors.length} error(s) decoding:\n\n${errors.map((e) => `* ${e}`).sort().join('\n')}`)
  }
  const privateKey = typeof raw.PrivateKey === 'string' ? raw.PrivateKey : ''
  const rootCert = typeof raw.RootCert === 'string' ? raw.RootCert : ''
  const keyType = typeof raw.PrivateKeyType === 'string' ? raw.PrivateKeyType : 'ec'
  const keyBits = raw.PrivateKeyBits === undefined ? 256 : Number(raw.PrivateKeyBits)
  const skipValidate = raw.SkipValidate === true || raw.SkipValidate === 'true'
  if (privateKey === '' && rootCert !== '') throw new DevAgentHttpError(500, 'must provide a private key when providing a root cert')
  if (!skipValidate) {
    if (leaf < HOUR_NS) throw new DevAgentHttpError(500, 'leaf cert TTL must be greater or equal than 1h0m0s')
    if (leaf > 8760n * HOUR_NS) throw new DevAgentHttpError(500, 'leaf cert TTL must be less than 8760h0m0s')
    if (intermediate < 3n * leaf) {
      throw new DevAgentHttpError(500, `Intermediate Cert TTL must be greater or equal than 3 * LeafCertTTL (>=${formatGoDuration(Number(3n * leaf) / 1e6)}).`)
    }
    if (keyType === 'ec' && !EC_BITS.includes(keyBits)) throw new DevAgentHttpError(500, 'EC key length must be one of (224, 256, 384, 521) bits')
    if (keyType === 'rsa' && !RSA_BITS.includes(keyBits)) throw new DevAgentHttpError(500, 'RSA key length must be 2048 or 4096 bits')
    if (keyType !== 'ec' && keyType !== 'rsa') throw new DevAgentHttpError(500, 'private key type must be either \'ec\' or \'rsa\'')
  }
  // Deliberate limits of the dev CA (not Consul's): P-256 keys only, no imported root certificate.
  if (keyType !== 'ec' || keyBits !== 256) {
    throw new DevAgentHttpError(500, 'the fastify-consul-native dev agent CA supports only EC P-256 keys (PrivateKeyType "ec", PrivateKeyBits 256)')
  }
  if (rootCert !== '') throw new DevAgentHttpError(500, 'the fastify-consul-native dev agent CA cannot import a RootCert; set only PrivateKey to rotate')
  const ms = Number(leaf) / 1e6
  if (ms <= 0) throw new DevAgentHttpError(500, 'leaf cert TTL must be positive')
  return { leafTTLms: ms, privateKey }
}
