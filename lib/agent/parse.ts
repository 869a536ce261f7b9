// Validators for the agent's JSON answers. Each one checks exactly the fields the plugin relies on,
// returns a fresh object of the wire type (unknown fields dropped, except a permission's criteria,
// which are refused; `null` for an omitted optional
// read as absent) and otherwise throws a ShapeError naming the JSON path at fault. Fields the
// plugin never reads are type-checked when present and defaulted when absent, so a Consul version
// that drops one does not stop the plugin. Pure functions; the client wraps ShapeError into
// AgentInvalidResponseError with the HTTP path.
import type {
  CARoot, ConnectAuthorizeResponse, IndexedCARoots, Intention, IntentionHTTPHeaderPermission,
  IntentionHTTPPermission, IntentionJWTRequirement, IntentionPermission, IssuedCert, RequestNormalization
} from './wire'

/** A body that does not have the documented shape; `at` is the JSON path, e.g. `api[1].Precedence`. */
export class ShapeError extends Error {
  readonly at: string
  constructor (at: string, reason: string) {
    super(at === '' ? reason : `${at}: ${reason}`)
    this.name = 'ShapeError'
    this.at = at
  }
}

export type ConfigEntryKind = 'service-defaults' | 'proxy-defaults' | 'mesh'

/** `service-defaults/<name>`: only the protocol matters (L7 on `http`, `http2`, `grpc`). */
export interface ServiceDefaultsView {
  readonly kind: 'service-defaults'
  readonly name: string
  /** `Protocol` as stored (Consul lowercases it on write); null when unset. */
  readonly protocol: string | null
}

/** `proxy-defaults/global`: the fallback protocol. */
export interface ProxyDefaultsView {
  readonly kind: 'proxy-defaults'
  readonly name: string
  /** `Config.protocol` as stored; null when unset. */
  readonly protocol: string | null
}

/** `mesh/mesh`: request normalization (Consul 1.20.1+; older agents never send it). */
export interface MeshView {
  readonly kind: 'mesh'
  /** `HTTP.Incoming.RequestNormalization`; null when the block is absent (Consul's defaults apply). */
  readonly requestNormalization: RequestNormalization | null
}

export interface ConfigEntryViews {
  'service-defaults': ServiceDefaultsView
  'proxy-defaults': ProxyDefaultsView
  mesh: MeshView
}
export type ConfigEntryView = ConfigEntryViews[ConfigEntryKind]

/** What `/v1/agent/self` tells about the default intention decision (docs/semantics.md#agent-self). */
export interface AgentSelfView {
  readonly datacenter: string
  readonly version: string | null
  /** `DebugConfig.DefaultIntentionPolicy` (Consul 1.18+); null when unset or not reported. */
  readonly defaultIntentionPolicy: 'allow' | 'deny' | null
  /** `DebugConfig.ACLResolverSettings.ACLDefaultPolicy` (or the pre-1.11 `DebugConfig.ACLDefaultPolicy`); null when not reported. */
  readonly aclDefaultPolicy: 'allow' | 'deny' | null
  /** `DebugConfig.ACLsEnabled`; null when not reported. */
  readonly aclsEnabled: boolean | null
}

type Obj = Record<string, unknown>

export function parseIssuedCert (body: unknown, service?: string): IssuedCert {
  const o = object(body, '')
  const cert: IssuedCert = {
    SerialNumber: string(o, 'SerialNumber', ''),
    CertPEM: pemText(o, 'CertPEM', 'CERTIFICATE'),
    PrivateKeyPEM: pemText(o, 'PrivateKeyPEM', 'PRIVATE KEY'),
    Service: string(o, 'Service', ''),
    ServiceURI: string(o, 'ServiceURI', ''),
    ValidAfter: timestamp(o, 'ValidAfter', ''),
    ValidBefore: timestamp(o, 'ValidBefore', ''),
    CreateIndex: optionalIndex(o, 'CreateIndex', ''),
    ModifyIndex: optionalIndex(o, 'ModifyIndex', '')
  }
  if (!cert.ServiceURI.startsWith('spiffe://')) {
    throw new ShapeError('ServiceURI', `expected a spiffe:// URI, got ${describe(cert.ServiceURI)}`)
  }
  if (service !== undefined && cert.Service !== service) {
    throw new ShapeError('Service', `certificate is for service "${cert.Service}", asked for "${service}"`)
  }
  setOptional(cert, 'Namespace', optionalString(o, 'Namespace', ''))
  setOptional(cert, 'Partition', optionalString(o, 'Partition', ''))
  return cert
}

export function parseCARoots (body: unknown): IndexedCARoots {
  const o = object(body, '')
  const roots = o.Roots
  if (!Array.isArray(roots) || roots.length === 0) {
    // A CA without roots cannot verify anyone; treat it like a not-yet-initialized CA.
    throw new ShapeError('Roots', `expected a non-empty array of CA roots, got ${describe(roots)}`)
  }
  const result: IndexedCARoots = {
    ActiveRootID: string(o, 'ActiveRootID', ''),
    TrustDomain: nonEmptyString(o, 'TrustDomain', ''),
    Roots: roots.map((r, i) => parseCARoot(r, `Roots[${i}]`))
  }
  if (!result.Roots.some((r) => r.ID === result.ActiveRootID)) {
    throw new ShapeError('ActiveRootID', `"${result.ActiveRootID}" is not the ID of any root`)
  }
  return result
}

function parseCARoot (value: unknown, at: string): CARoot {
  const o = object(value, at)
  const intermediates = o.IntermediateCerts
  let IntermediateCerts: string[] | null = null
  if (intermediates !== undefined && intermediates !== null) {
    IntermediateCerts = array(intermediates, `${at}.IntermediateCerts`)
      .map((v, i) => pemValue(v, `${at}.IntermediateCerts[${i}]`, 'CERTIFICATE'))
  }
  return {
    ID: nonEmptyString(o, 'ID', at),
    Name: optionalString(o, 'Name', at) ?? '',
    SerialNumber: optionalNumber(o, 'SerialNumber', at) ?? 0,
    SigningKeyID: string(o, 'SigningKeyID', at),
    ExternalTrustDomain: optionalString(o, 'ExternalTrustDomain', at) ?? '',
    NotBefore: optionalString(o, 'NotBefore', at) ?? '',
    NotAfter: optionalString(o, 'NotAfter', at) ?? '',
    RootCert: pemText(o, 'RootCert', 'CERTIFICATE', at),
    IntermediateCerts,
    Active: boolean(o, 'Active', at),
    PrivateKeyType: optionalString(o, 'PrivateKeyType', at) ?? '',
    PrivateKeyBits: optionalNumber(o, 'PrivateKeyBits', at) ?? 0,
    CreateIndex: optionalIndex(o, 'CreateIndex', at),
    ModifyIndex: optionalIndex(o, 'ModifyIndex', at)
  }
}

/**
 * `/v1/connect/intentions/match` is keyed by the `name` value exactly as sent; a `null` list
 * (nothing matches) reads as empty.
 */
export function parseIntentionMatch (body: unknown, name: string): Intention[] {
  const o = object(body, '')
  if (!Object.hasOwn(o, name)) {
    throw new ShapeError('', `no entry for "${name}" (keys: ${Object.keys(o).map((k) => `"${k}"`).join(', ') || 'none'})`)
  }
  const list = o[name]
  if (list === null) return []
  return array(list, name).map((v, i) => parseIntention(v, `${name}[${i}]`))
}

export function parseIntention (value: unknown, at = ''): Intention {
  const o = object(value, at)
  const ixn: Intention = {
    SourceNS: string(o, 'SourceNS', at),
    SourceName: nonEmptyString(o, 'SourceName', at),
    SourceType: optionalString(o, 'SourceType', at) ?? 'consul',
    DestinationNS: string(o, 'DestinationNS', at),
    DestinationName: nonEmptyString(o, 'DestinationName', at),
    Precedence: integer(o, 'Precedence', at),
    CreateIndex: optionalIndex(o, 'CreateIndex', at),
    ModifyIndex: optionalIndex(o, 'ModifyIndex', at)
  }
  for (const key of ['ID', 'Description', 'SourcePartition', 'SourcePeer', 'SourceSamenessGroup', 'DestinationPartition'] as const) {
    setOptional(ixn, key, optionalString(o, key, at))
  }
  setOptional(ixn, 'Action', optionalAction(o, at))
  if (o.Permissions !== undefined && o.Permissions !== null) {
    ixn.Permissions = array(o.Permissions, join(at, 'Permissions'))
      .map((p, i) => parsePermission(p, `${join(at, 'Permissions')}[${i}]`))
  }
  // Consul omits Action exactly when Permissions is non-empty; anything else has no defined meaning.
  if ((ixn.Action === undefined) === (ixn.Permissions === undefined || ixn.Permissions.length === 0)) {
    throw new ShapeError(at, ixn.Action === undefined
      ? 'has neither Action nor Permissions'
      : 'has both Action and Permissions')
  }
  setOptional(ixn, 'JWT', optionalJWT(o, at))
  setOptional(ixn, 'Meta', optionalStringMap(o, 'Meta', at))
  return ixn
}

const PERMISSION_FIELDS = new Set(['Action', 'HTTP', 'JWT'])
const HTTP_FIELDS = new Set(['PathExact', 'PathPrefix', 'PathRegex', 'Methods', 'Header'])
const HEADER_FIELDS = new Set(['Name', 'Present', 'Exact', 'Prefix', 'Suffix', 'Contains', 'Regex', 'Invert', 'IgnoreCase'])

/**
 * A criterion of a permission this plugin does not know (a newer Consul's) cannot be dropped:
 * ignoring it would widen what an allow permits (docs/semantics.md#permission-validation). Consul
 * omits unset fields, so only a set value is refused; the update is rejected as a whole.
 */
function rejectUnknownCriteria (o: Obj, known: ReadonlySet<string>, at: string): void {
  for (const key in o) {
    if (known.has(key) || isUnset(o[key])) continue
    throw new ShapeError(join(at, key), 'is not a criterion this plugin can evaluate; refusing the update rather than ignoring it')
  }
}

function isUnset (v: unknown): boolean {
  if (v === undefined || v === null || v === '' || v === false || v === 0) return true
  if (Array.isArray(v)) return v.length === 0
  return typeof v === 'object' && Object.keys(v as object).length === 0
}

function parsePermission (value: unknown, at: string): IntentionPermission {
  const o = object(value, at)
  const action = optionalAction(o, at)
  if (action === undefined) throw new ShapeError(join(at, 'Action'), 'expected "allow" or "deny", got nothing')
  rejectUnknownCriteria(o, PERMISSION_FIELDS, at)
  const perm: IntentionPermission = { Action: action }
  if (o.HTTP !== undefined && o.HTTP !== null) perm.HTTP = parseHTTPPermission(o.HTTP, join(at, 'HTTP'))
  setOptional(perm, 'JWT', optionalJWT(o, at))
  return perm
}

function parseHTTPPermission (value: unknown, at: string): IntentionHTTPPermission {
  const o = object(value, at)
  rejectUnknownCriteria(o, HTTP_FIELDS, at)
  const http: IntentionHTTPPermission = {}
  for (const key of ['PathExact', 'PathPrefix', 'PathRegex'] as const) {
    setOptional(http, key, optionalString(o, key, at))
  }
  setOptional(http, 'Methods', optionalStringArray(o, 'Methods', at))
  if (o.Header !== undefined && o.Header !== null) {
    http.Header = array(o.Header, join(at, 'Header')).map((h, i) => parseHeaderPermission(h, `${join(at, 'Header')}[${i}]`))
  }
  return http
}

function parseHeaderPermission (value: unknown, at: string): IntentionHTTPHeaderPermission {
  const o = object(value, at)
  rejectUnknownCriteria(o, HEADER_FIELDS, at)
  const header: IntentionHTTPHeaderPermission = { Name: nonEmptyString(o, 'Name', at) }
  for (const key of ['Exact', 'Prefix', 'Suffix', 'Contains', 'Regex'] as const) {
    setOptional(header, key, optionalString(o, key, at))
  }
  for (const key of ['Present', 'Invert', 'IgnoreCase'] as const) {
    setOptional(header, key, optionalBoolean(o, key, at))
  }
  return header
}

/** A JWT requirement: its providers and the claims each must verify (docs/semantics.md#jwt). */
function optionalJWT (o: Obj, at: string): IntentionJWTRequirement | undefined {
  const raw = o.JWT
  if (raw === undefined || raw === null) return undefined
  const j = object(raw, join(at, 'JWT'))
  const jwt: IntentionJWTRequirement = {}
  if (j.Providers !== undefined && j.Providers !== null) {
    const pat = join(at, 'JWT.Providers')
    jwt.Providers = array(j.Providers, pat).map((p, i) => {
      const po = object(p, `${pat}[${i}]`)
      const provider: NonNullable<IntentionJWTRequirement['Providers']>[number] = { Name: string(po, 'Name', `${pat}[${i}]`) }
      if (po.VerifyClaims !== undefined && po.VerifyClaims !== null) {
        const cat = `${pat}[${i}].VerifyClaims`
        provider.VerifyClaims = array(po.VerifyClaims, cat).map((c, k) => {
          const co = object(c, `${cat}[${k}]`)
          const claim: { Path?: string[], Value?: string } = {}
          setOptional(claim, 'Path', optionalStringArray(co, 'Path', `${cat}[${k}]`))
          setOptional(claim, 'Value', optionalString(co, 'Value', `${cat}[${k}]`))
          return claim
        })
      }
      return provider
    })
  }
  return jwt
}

export function parseConfigEntry<K extends ConfigEntryKind> (kind: K, body: unknown): ConfigEntryViews[K]
export function parseConfigEntry (kind: ConfigEntryKind, body: unknown): ConfigEntryView {
  const o = object(body, '')
  const gotKind = optionalString(o, 'Kind', '')
  if (gotKind !== undefined && gotKind !== kind) {
    throw new ShapeError('Kind', `expected "${kind}", got "${gotKind}"`)
  }
  switch (kind) {
    case 'service-defaults':
      return { kind, name: string(o, 'Name', ''), protocol: nonEmptyOrNull(optionalString(o, 'Protocol', '')) }
    case 'proxy-defaults': {
      let protocol: string | undefined
      if (o.Config !== undefined && o.Config !== null) protocol = optionalString(object(o.Config, 'Config'), 'protocol', 'Config')
      return { kind, name: string(o, 'Name', ''), protocol: nonEmptyOrNull(protocol) }
    }
    case 'mesh':
      return { kind, requestNormalization: requestNormalization(o) }
  }
}

const ESCAPED_SLASHES_ACTIONS = ['', 'IMPLEMENTATION_SPECIFIC_DEFAULT', 'KEEP_UNCHANGED', 'REJECT_REQUEST', 'UNESCAPE_AND_REDIRECT', 'UNESCAPE_AND_FORWARD'] as const
const UNDERSCORE_ACTIONS = ['', 'ALLOW', 'REJECT_REQUEST', 'DROP_HEADER'] as const

/** Unknown enum values are rejected, not ignored: these settings decide which path is authorized. */
function requestNormalization (mesh: Obj): RequestNormalization | null {
  let at = 'HTTP'
  if (mesh.HTTP === undefined || mesh.HTTP === null) return null
  const http = object(mesh.HTTP, at)
  if (http.Incoming === undefined || http.Incoming === null) return null
  const incoming = object(http.Incoming, at = 'HTTP.Incoming')
  if (incoming.RequestNormalization === undefined || incoming.RequestNormalization === null) return null
  const o = object(incoming.RequestNormalization, at = 'HTTP.Incoming.RequestNormalization')
  const rn: RequestNormalization = {}
  setOptional(rn, 'InsecureDisablePathNormalization', optionalBoolean(o, 'InsecureDisablePathNormalization', at))
  setOptional(rn, 'MergeSlashes', optionalBoolean(o, 'MergeSlashes', at))
  setOptional(rn, 'PathWithEscapedSlashesAction', optionalEnum(o, 'PathWithEscapedSlashesAction', ESCAPED_SLASHES_ACTIONS, at))
  setOptional(rn, 'HeadersWithUnderscoresAction', optionalEnum(o, 'HeadersWithUnderscoresAction', UNDERSCORE_ACTIONS, at))
  return rn
}

export function parseAgentSelf (body: unknown): AgentSelfView {
  const o = object(body, '')
  const config = object(o.Config, 'Config')
  let debug: Obj = {}
  if (o.DebugConfig !== undefined && o.DebugConfig !== null) debug = object(o.DebugConfig, 'DebugConfig')
  let resolver: Obj = {}
  if (debug.ACLResolverSettings !== undefined && debug.ACLResolverSettings !== null) {
    resolver = object(debug.ACLResolverSettings, 'DebugConfig.ACLResolverSettings')
  }
  return {
    datacenter: nonEmptyString(config, 'Datacenter', 'Config'),
    version: optionalString(config, 'Version', 'Config') ?? null,
    defaultIntentionPolicy: policy(debug, 'DefaultIntentionPolicy', 'DebugConfig'),
    aclDefaultPolicy: policy(resolver, 'ACLDefaultPolicy', 'DebugConfig.ACLResolverSettings') ??
      policy(debug, 'ACLDefaultPolicy', 'DebugConfig'),
    aclsEnabled: optionalBoolean(debug, 'ACLsEnabled', 'DebugConfig') ?? null
  }
}

/**
 * The datacenter of the servers in a `/v1/health/service/consul` answer (Consul's own service, on
 * every server of the datacenter queried): the first instance's `Node.Datacenter`.
 */
export function parseServersDatacenter (body: unknown): string {
  const list = array(body, '')
  if (list.length === 0) throw new ShapeError('', 'no instance of the consul service (a server): cannot tell the datacenter; set the datacenter option')
  const node = object(object(list[0], '[0]').Node, '[0].Node')
  return nonEmptyString(node, 'Datacenter', '[0].Node')
}

/** Consul validates these at start-up, so any other value means we misread the body: fail rather than guess. */
function policy (o: Obj, key: string, at: string): 'allow' | 'deny' | null {
  const v = optionalEnum(o, key, ['', 'allow', 'deny'] as const, at)
  return v === undefined || v === '' ? null : v
}

export function parseAuthorize (body: unknown): ConnectAuthorizeResponse {
  const o = object(body, '')
  return { Authorized: boolean(o, 'Authorized', ''), Reason: optionalString(o, 'Reason', '') ?? '' }
}

// ---- primitives ----

function join (at: string, key: string): string {
  return at === '' ? key : `${at}.${key}`
}

function describe (v: unknown): string {
  if (v === null) return 'null'
  if (Array.isArray(v)) return 'an array'
  if (typeof v === 'string') return v.length > 40 ? `a string "${v.slice(0, 40)}…"` : `"${v}"`
  if (typeof v === 'object') return 'an object'
  return v === undefined ? 'nothing' : `${typeof v} ${String(v)}`
}

function object (v: unknown, at: string): Obj {
  if (v === null || typeof v !== 'object' || Array.isArray(v)) throw new ShapeError(at, `expected an object, got ${describe(v)}`)
  return v as Obj
}

function array (v: unknown, at: string): unknown[] {
  if (!Array.isArray(v)) throw new ShapeError(at, `expected an array, got ${describe(v)}`)
  return v
}

function string (o: Obj, key: string, at: string): string {
  const v = o[key]
  if (typeof v !== 'string') throw new ShapeError(join(at, key), `expected a string, got ${describe(v)}`)
  return v
}

function nonEmptyString (o: Obj, key: string, at: string): string {
  const v = string(o, key, at)
  if (v === '') throw new ShapeError(join(at, key), 'expected a non-empty string')
  return v
}

function optionalString (o: Obj, key: string, at: string): string | undefined {
  return o[key] === undefined || o[key] === null ? undefined : string(o, key, at)
}

function optionalStringArray (o: Obj, key: string, at: string): string[] | undefined {
  const v = o[key]
  if (v === undefined || v === null) return undefined
  return array(v, join(at, key)).map((s, i) => {
    if (typeof s !== 'string') throw new ShapeError(`${join(at, key)}[${i}]`, `expected a string, got ${describe(s)}`)
    return s
  })
}

function optionalStringMap (o: Obj, key: string, at: string): Record<string, string> | undefined {
  const v = o[key]
  if (v === undefined || v === null) return undefined
  const m = object(v, join(at, key))
  const out: Record<string, string> = {}
  for (const k of Object.keys(m)) out[k] = string(m, k, join(at, key))
  return out
}

function optionalEnum<E extends string> (o: Obj, key: string, allowed: readonly E[], at: string): E | undefined {
  const v = optionalString(o, key, at)
  if (v !== undefined && !(allowed as readonly string[]).includes(v)) {
    throw new ShapeError(join(at, key), `expected one of ${allowed.filter((a) => a !== '').join(', ')}, got "${v}"`)
  }
  return v as E | undefined
}

function optionalAction (o: Obj, at: string): 'allow' | 'deny' | undefined {
  const v = o.Action
  if (v === undefined || v === null) return undefined
  if (v !== 'allow' && v !== 'deny') throw new ShapeError(join(at, 'Action'), `expected "allow" or "deny", got ${describe(v)}`)
  return v
}

function boolean (o: Obj, key: string, at: string): boolean {
  const v = o[key]
  if (typeof v !== 'boolean') throw new ShapeError(join(at, key), `expected a boolean, got ${describe(v)}`)
  return v
}

function optionalBoolean (o: Obj, key: string, at: string): boolean | undefined {
  return o[key] === undefined || o[key] === null ? undefined : boolean(o, key, at)
}

function integer (o: Obj, key: string, at: string): number {
  const v = o[key]
  if (typeof v !== 'number' || !Number.isSafeInteger(v)) throw new ShapeError(join(at, key), `expected an integer, got ${describe(v)}`)
  return v
}

function optionalNumber (o: Obj, key: string, at: string): number | undefined {
  const v = o[key]
  if (v === undefined || v === null) return undefined
  if (typeof v !== 'number' || !Number.isFinite(v)) throw new ShapeError(join(at, key), `expected a number, got ${describe(v)}`)
  return v
}

/** Raft indexes are informational here: 0 when absent, but never a wrong type. */
function optionalIndex (o: Obj, key: string, at: string): number {
  return o[key] === undefined || o[key] === null ? 0 : integer(o, key, at)
}

function timestamp (o: Obj, key: string, at: string): string {
  const v = string(o, key, at)
  if (Number.isNaN(Date.parse(v))) throw new ShapeError(join(at, key), `expected an RFC 3339 time, got ${describe(v)}`)
  return v
}

function pemText (o: Obj, key: string, label: string, at = ''): string {
  return pemValue(o[key], join(at, key), label)
}

/** Only a cheap marker check: the certificate code parses the PEM and reports its own errors. */
function pemValue (v: unknown, at: string, label: string): string {
  if (typeof v !== 'string' || !v.includes('-----BEGIN ') || !v.includes(`${label}-----`)) {
    throw new ShapeError(at, `expected PEM text (${label}), got ${describe(v)}`)
  }
  return v
}

function nonEmptyOrNull (v: string | undefined): string | null {
  return v === undefined || v === '' ? null : v
}

function setOptional<T extends object, K extends keyof T> (target: T, key: K, value: T[K] | undefined): void {
  if (value !== undefined) target[key] = value
}
