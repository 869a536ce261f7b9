// Public entry `fastify-consul-native/dev-agent`: an in-process stand-in for a Consul agent in dev
// mode, speaking the HTTP API a Connect-native service uses (docs/semantics.md#agent-api), for demos and tests.
import { hostname } from 'node:os'
import { formatGoDuration, parseGoDuration } from './blocking'
import type { DevCertificateAuthority } from './ca'
import { DevGrpcServer } from './grpc'
import { DevAgentServer } from './server'
import type { Policy, Privilege, RequestLogEntry } from './server'

export { DevCertificateAuthority } from './ca'
export { DevAgentHttpError } from './http-error'
export type { RequestLogEntry } from './server'

export interface DevAgentOptions {
  /** TCP port; 0 (the default) picks a free one. */
  port?: number
  /** Default `127.0.0.1`. */
  host?: string
  /**
   * Also serve Consul's gRPC `ConnectCAService` (WatchRoots, Sign) on this port, for agentless
   * clients (`certificates: { source: 'consul-grpc' }`); 0 picks a free one. Default: no gRPC port.
   */
  grpcPort?: number
  /** Serve the gRPC port over TLS, with a certificate from a CA of its own (`grpcCaPem`). Default false (plaintext). */
  grpcTls?: boolean
  /** Default `dc1`. */
  datacenter?: string
  /** Default: the machine's host name, as `consul agent -dev`. */
  nodeName?: string
  /** Initial `LeafCertTTL`: a Go duration (`72h`) or milliseconds. Default 72h. */
  leafTTL?: string | number
  /**
   * The agent's `default_intention_policy`. When unset the agent behaves as Consul with ACLs
   * disabled: intentions default to allow.
   */
  defaultPolicy?: 'allow' | 'deny'
  acl?: {
    /** Default false. */
    enabled?: boolean
    /** `acl.default_policy`, also sent as `X-Consul-Default-ACL-Policy`. Default `allow`. */
    defaultPolicy?: 'allow' | 'deny'
    /**
     * Token secret → privilege. `read` allows reads, `write` also writes (services, checks,
     * intentions, service-defaults, leaves, authorize), `manage` everything (operator writes: CA
     * configuration, proxy-defaults, mesh). Without a token the default policy applies.
     */
    tokens?: Record<string, 'read' | 'write' | 'manage'>
  }
}

export interface DevAgent {
  /** Base URL, e.g. `http://127.0.0.1:8500`. */
  readonly address: string
  readonly host: string
  readonly port: number
  readonly trustDomain: string
  readonly datacenter: string
  /**
   * The agent's CA. `ca.rotate()` rotates like a CA configuration change with a new key: roots
   * and leaf watchers are woken and leaves are re-issued.
   */
  readonly ca: DevCertificateAuthority
  /** `host:port` of the gRPC port, or null without `grpcPort`. */
  readonly grpcAddress: string | null
  /** PEM of the CA that signed the gRPC port's certificate (`grpcTls`), else null. */
  readonly grpcCaPem: string | null
  /**
   * Every HTTP request (method and path without query) and gRPC call (`gRPC`, full method name)
   * served, oldest first; the newest 10 000 are kept.
   */
  readonly requestLog: readonly RequestLogEntry[]
  /** Releases all blocked queries, stops check runners and timers, closes every socket. */
  close: () => Promise<void>
}

const POLICIES = new Set(['allow', 'deny'])
const PRIVILEGES = new Set(['read', 'write', 'manage'])

function fail (option: string, problem: string): never {
  throw new TypeError(`Invalid dev agent option ${option}: ${problem}`)
}

function text (value: unknown, option: string, fallback: string): string {
  if (value === undefined) return fallback
  if (typeof value !== 'string' || value === '') fail(option, 'must be a non-empty string')
  return value
}

function policy (value: unknown, option: string): Policy | undefined {
  if (value === undefined) return undefined
  if (typeof value !== 'string' || !POLICIES.has(value)) fail(option, 'must be "allow" or "deny"')
  return value as Policy
}

/** Leaves are valid from a minute before they are issued, as Consul's are: a lifetime must outlast that. */
const LEAF_BACKDATE_MS = 60_000

function leafTTL (value: unknown): { ms: number, text: string } {
  if (value === undefined) return { ms: 72 * 3_600_000, text: '72h' }
  let ttl: { ms: number, text: string }
  if (typeof value === 'number') {
    if (!Number.isFinite(value) || value <= 0) fail('leafTTL', 'must be a positive number of milliseconds')
    ttl = { ms: value, text: formatGoDuration(value) }
  } else {
    const ms = typeof value === 'string' ? parseGoDuration(value) : null
    if (ms === null || ms <= 0) fail('leafTTL', `must be a positive Go duration such as "72h", got ${JSON.stringify(value)}`)
    ttl = { ms, text: value as string }
  }
  if (ttl.ms <= LEAF_BACKDATE_MS) {
    fail('leafTTL', `must be longer than 1m, got ${ttl.text}: a leaf is valid from one minute before it is issued (as Consul's are), so it would be expired already`)
  }
  return ttl
}

/** Starts a dev agent listening on `host:port`. */
export async function startDevAgent (options: DevAgentOptions = {}): Promise<DevAgent> {
  const port = options.port ?? 0
  if (!Number.isInteger(port) || port < 0 || port > 65535) fail('port', 'must be an integer from 0 to 65535')
  const grpcPort = options.grpcPort
  if (grpcPort !== undefined && (!Number.isInteger(grpcPort) || grpcPort < 0 || grpcPort > 65535)) fail('grpcPort', 'must be an integer from 0 to 65535')
  if (options.grpcTls !== undefined && typeof options.grpcTls !== 'boolean') fail('grpcTls', 'must be a boolean')
  const host = text(options.host, 'host', '127.0.0.1')
  const datacenter = text(options.datacenter, 'datacenter', 'dc1')
  if (!/^[A-Za-z0-9_-]+$/.test(datacenter)) fail('datacenter', 'may contain only letters, digits, "_" and "-"')
  const nodeName = text(options.nodeName, 'nodeName', hostname())
  const ttl = leafTTL(options.leafTTL)
  const acl = options.acl ?? {}
  const tokens = acl.tokens ?? {}
  for (const [token, privilege] of Object.entries(tokens)) {
    if (!PRIVILEGES.has(privilege)) fail(`acl.tokens[${JSON.stringify(token)}]`, 'must be "read", "write" or "manage"')
  }
  const server = await DevAgentServer.start({
    host,
    port,
    datacenter,
    nodeName,
    leafTTLms: ttl.ms,
    leafTTLText: ttl.text,
    defaultIntentionPolicy: policy(options.defaultPolicy, 'defaultPolicy'),
    acl: { enabled: acl.enabled === true, defaultPolicy: policy(acl.defaultPolicy, 'acl.defaultPolicy') ?? 'allow', tokens: { ...tokens } as Record<string, Privilege> },
    rotationJitterMs: 500,
    random: Math.random
  })
  const boundPort = server.port
  // A wildcard bind is reached through loopback.
  const urlHost = host === '0.0.0.0' ? '127.0.0.1' : host === '::' ? '[::1]' : host.includes(':') ? `[${host}]` : host
  let grpc: DevGrpcServer | null = null
  if (grpcPort !== undefined) {
    try {
      grpc = await DevGrpcServer.start(server, { host, port: grpcPort, tls: options.grpcTls === true, datacenter })
    } catch (err) {
      await server.close()
      throw err
    }
  }
  return {
    address: `http://${urlHost}:${boundPort}`,
    host,
    port: boundPort,
    trustDomain: server.ca.trustDomain,
    datacenter,
    ca: server.ca,
    grpcAddress: grpc === null ? null : `${urlHost}:${grpc.port}`,
    grpcCaPem: grpc?.caPem ?? null,
    requestLog: server.requestLog,
    close: async () => {
      await grpc?.close()
      await server.close()
    }
  }
}
