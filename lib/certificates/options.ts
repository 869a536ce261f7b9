// The `certificates` option (docs/semantics.md#certificate-sources): its shapes, validated once at
// registration. Environment variables (CONSUL_GRPC_ADDR, CONSUL_GRPC_CACERT,
// SPIFFE_CREDENTIAL_FOLDER) are read when the source is built.
import { InvalidOptionError } from '../errors'

/** The local agent's leaf and roots endpoints (the default). */
export interface AgentCertificatesOptions {
  source: 'agent'
}

/** Agentless: a Consul server's public gRPC `ConnectCAService` (WatchRoots, Sign). */
export interface ConsulGrpcCertificatesOptions {
  source: 'consul-grpc'
  /** `host:port` of a server's gRPC port, or `https://host:port` / `http://host:port` (plaintext). Default CONSUL_GRPC_ADDR. */
  address?: string
  /** PEM of the CA that signed the server's certificate. Default: the file named by CONSUL_GRPC_CACERT, else the system CAs. */
  ca?: string | Buffer
  /** Path of that PEM; `ca` and `caFile` exclude each other. */
  caFile?: string
  /** Name the server's certificate must carry. Default: the host of `address`. */
  tlsServerName?: string
  /** Plaintext gRPC (Consul's `ports.grpc`); default false (TLS, `ports.grpc_tls`). */
  plaintext?: boolean
}

/** Certificate, key and CA bundle files, re-read when they change. */
export interface FilesCertificatesOptions {
  source: 'files'
  /**
   * A folder in one of the known layouts: SPIFFE credential folder, or cert-manager's
   * csi-driver-spiffe (`tls.crt`, `tls.key`, `ca.crt`). Default SPIFFE_CREDENTIAL_FOLDER.
   */
  dir?: string
  /** Explicit files (Vault Agent, consul-template): the leaf chain, its key, the CA bundle. All three, or `dir`. */
  certFile?: string
  keyFile?: string
  caFile?: string
  /** Default: the trust domain of the leaf's own SPIFFE ID. */
  trustDomain?: string
  /** Polling interval behind the file watcher (ms). Default 1000. */
  pollInterval?: number
}

export type CertificatesOptions = AgentCertificatesOptions | ConsulGrpcCertificatesOptions | FilesCertificatesOptions

const KNOWN: Record<CertificatesOptions['source'], readonly string[]> = {
  agent: ['source'],
  'consul-grpc': ['source', 'address', 'ca', 'caFile', 'tlsServerName', 'plaintext'],
  files: ['source', 'dir', 'certFile', 'keyFile', 'caFile', 'trustDomain', 'pollInterval']
}
const TRUST_DOMAIN = /^[A-Za-z0-9._-]+$/
export const DEFAULT_FILES_POLL_MS = 1000

export function resolveCertificatesOption (value: unknown): CertificatesOptions {
  if (value === undefined) return { source: 'agent' }
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    fail('certificates', "must be an object such as { source: 'agent' | 'consul-grpc' | 'files' }")
  }
  const o = value as Record<string, unknown>
  const source = o.source ?? 'agent'
  if (typeof source !== 'string' || !Object.hasOwn(KNOWN, source)) {
    fail('certificates.source', `must be one of 'agent', 'consul-grpc', 'files', got ${JSON.stringify(source)}`)
  }
  const known = KNOWN[source as CertificatesOptions['source']]
  for (const key of Object.keys(o)) {
    if (!known.includes(key)) fail(`certificates.${key}`, `is not an option of source '${source}' (known: ${known.join(', ')})`)
  }
  if (source === 'agent') return { source }
  if (source === 'consul-grpc') {
    const out: ConsulGrpcCertificatesOptions = { source }
    setString(o, out, 'address')
    setString(o, out, 'caFile')
    setString(o, out, 'tlsServerName')
    if (o.ca !== undefined) {
      if (!(typeof o.ca === 'string' || Buffer.isBuffer(o.ca)) || o.ca.length === 0) fail('certificates.ca', 'must be a non-empty PEM string or Buffer')
      if (o.caFile !== undefined) fail('certificates.ca', 'set either certificates.ca or certificates.caFile, not both')
      out.ca = o.ca
    }
    if (o.plaintext !== undefined) {
      if (typeof o.plaintext !== 'boolean') fail('certificates.plaintext', 'must be a boolean')
      out.plaintext = o.plaintext
    }
    return out
  }
  const out: FilesCertificatesOptions = { source: 'files' }
  for (const name of ['dir', 'certFile', 'keyFile', 'caFile', 'trustDomain'] as const) setString(o, out, name)
  const files = [out.certFile, out.keyFile, out.caFile].filter((f) => f !== undefined).length
  if (files !== 0 && files !== 3) fail('certificates.certFile', 'give certFile, keyFile and caFile together (or dir alone)')
  if (files === 3 && out.dir !== undefined) fail('certificates.dir', 'give either dir or certFile/keyFile/caFile, not both')
  if (out.trustDomain !== undefined && !TRUST_DOMAIN.test(out.trustDomain)) {
    fail('certificates.trustDomain', `must be a trust domain such as "11111111-2222-3333-4444-555555555555.consul", got ${JSON.stringify(out.trustDomain)}`)
  }
  if (o.pollInterval !== undefined) {
    const ms = o.pollInterval
    if (typeof ms !== 'number' || !Number.isFinite(ms) || ms < 10 || ms > 300_000) {
      fail('certificates.pollInterval', `must be a number of milliseconds from 10 to 300000, got ${JSON.stringify(ms)}`)
    }
    out.pollInterval = Math.floor(ms)
  }
  return out
}

function setString<T extends object> (o: Record<string, unknown>, out: T, name: keyof T & string): void {
  const value = o[name]
  if (value === undefined) return
  if (typeof value !== 'string' || value === '') fail(`certificates.${name}`, 'must be a non-empty string')
  ;(out as Record<string, unknown>)[name] = value
}

function fail (name: string, reason: string): never {
  throw new InvalidOptionError(name, reason)
}
