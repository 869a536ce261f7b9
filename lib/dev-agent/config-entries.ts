// Config entries of the dev agent: `service-intentions`, `service-defaults`, `proxy-defaults` and
// `mesh`, decoded, normalised and validated as Consul CE does (docs/semantics.md#config-entry-writes),
// plus the intention match computation (docs/semantics.md#intention-match, docs/semantics.md#precedence).
//
// Where Consul 1.10 (the agent of test/fixtures/consul) and current Consul differ, current Consul is followed:
// header `Contains`/`IgnoreCase` and the mesh `HTTP.Incoming.RequestNormalization` block (1.20.1+)
// are accepted. `Hash`, which current Consul adds to stored entries, is not returned, to keep the
// 1.10 shapes of test/fixtures/consul.
import type { Intention, IntentionPermission, IntentionJWTRequirement } from '../agent/wire'
import { parseGoDurationNs } from './blocking'
import { DevAgentHttpError } from './http-error'
import { renderJwtProvider, validateJwtProvider } from './jwt-provider'

export const SERVICE_INTENTIONS = 'service-intentions'
export const SERVICE_DEFAULTS = 'service-defaults'
export const PROXY_DEFAULTS = 'proxy-defaults'
export const MESH = 'mesh'
export const JWT_PROVIDER = 'jwt-provider'

// Kinds Consul knows but the dev agent does not store: writing one is refused explicitly rather
// than with Consul's "invalid config entry kind", which would claim the kind does not exist.
const UNSUPPORTED_KINDS = new Set([
  'service-router', 'service-splitter', 'service-resolver', 'ingress-gateway', 'terminating-gateway',
  'exported-services', 'sameness-group', 'api-gateway', 'bound-api-gateway', 'inline-certificate',
  'http-route', 'tcp-route', 'file-system-certificate', 'control-plane-request-limit',
  'registration', 'prepared-query'
])
const KINDS = [SERVICE_INTENTIONS, SERVICE_DEFAULTS, PROXY_DEFAULTS, MESH, JWT_PROVIDER]
const WILDCARD = '*'
const HTTP_METHODS = new Set(['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'CONNECT', 'OPTIONS', 'TRACE'])
const HTTP_LIKE = new Set(['http', 'http2', 'grpc'])
const META_MAX_PAIRS = 64
const META_KEY_MAX = 128
const META_VALUE_MAX = 512
const ESCAPED_SLASHES_ACTIONS = new Set(['', 'IMPLEMENTATION_SPECIFIC_DEFAULT', 'KEEP_UNCHANGED', 'REJECT_REQUEST', 'UNESCAPE_AND_REDIRECT', 'UNESCAPE_AND_FORWARD'])
const UNDERSCORES_ACTIONS = new Set(['', 'ALLOW', 'REJECT_REQUEST', 'DROP_HEADER'])

// ---------------------------------------------------------------------------------------------
// Decoding: a small model of Consul's mapstructure decode (weakly typed, case-insensitive field
// names, `alias` tags, one-element slices unwrapped, unknown keys reported with their full path).

type Spec =
  | { t: 'string' | 'bool' | 'int' | 'uint' | 'any' | 'stringMap' | 'anyMap' | 'duration' }
  | { t: 'slice', of: Spec }
  | { t: 'struct', fields: Field[] }

interface Field { name: string, alias?: string, spec: Spec }

const str: Spec = { t: 'string' }
const bool: Spec = { t: 'bool' }
const int: Spec = { t: 'int' }
const uint: Spec = { t: 'uint' }
const any: Spec = { t: 'any' }
const stringMap: Spec = { t: 'stringMap' }
const anyMap: Spec = { t: 'anyMap' }
/** time.Duration: a number of nanoseconds, or Go duration text (mapstructure's StringToTimeDurationHookFunc). */
const duration: Spec = { t: 'duration' }
const slice = (of: Spec): Spec => ({ t: 'slice', of })
const struct = (...fields: Field[]): Spec => ({ t: 'struct', fields })
const f = (name: string, spec: Spec, alias?: string): Field => alias === undefined ? { name, spec } : { name, spec, alias }

const jwtSpec = struct(
  f('Providers', slice(struct(
    f('Name', str),
    f('VerifyClaims', slice(struct(f('Path', slice(str)), f('Value', str))), 'verify_claims')
  )))
)
const headerSpec = struct(
  f('Name', str), f('Present', bool), f('Exact', str), f('Prefix', str), f('Suffix', str),
  f('Contains', str), f('Regex', str), f('Invert', bool), f('IgnoreCase', bool, 'ignore_case')
)
const httpSpec = struct(
  f('PathExact', str, 'path_exact'), f('PathPrefix', str, 'path_prefix'), f('PathRegex', str, 'path_regex'),
  f('Header', slice(headerSpec)), f('Methods', slice(str))
)
const sourceSpec = struct(
  f('Name', str), f('Action', str),
  f('Permissions', slice(struct(f('Action', str), f('HTTP', httpSpec), f('JWT', jwtSpec)))),
  f('Precedence', int), f('LegacyID', str, 'legacy_id'), f('Type', str), f('Description', str),
  f('LegacyMeta', stringMap, 'legacy_meta'), f('LegacyCreateTime', any, 'legacy_create_time'),
  f('LegacyUpdateTime', any, 'legacy_update_time'), f('Peer', str), f('SamenessGroup', str, 'sameness_group')
)
const transparentProxySpec = struct(f('OutboundListenerPort', int, 'outbound_listener_port'), f('DialedDirectly', bool, 'dialed_directly'))
const meshGatewaySpec = struct(f('Mode', str))
const exposeSpec = struct(f('Checks', bool), f('Paths', slice(struct(
  f('ListenerPort', int, 'listener_port'), f('Path', str), f('LocalPathPort', int, 'local_path_port'),
  f('Protocol', str), f('ParsedFromCheck', bool, 'parsed_from_check')
))))
const jwtProviderSpec = struct(
  f('Kind', str), f('Name', str),
  f('JSONWebKeySet', struct(
    f('Local', struct(f('JWKS', str), f('Filename', str))),
    f('Remote', struct(
      f('URI', str), f('RequestTimeoutMs', int, 'request_timeout_ms'), f('CacheDuration', duration, 'cache_duration'),
      f('FetchAsynchronously', bool, 'fetch_asynchronously'),
      f('RetryPolicy', struct(
        f('NumRetries', int, 'num_retries'),
        f('RetryPolicyBackOff', struct(f('BaseInterval', duration, 'base_interval'), f('MaxInterval', duration, 'max_interval')), 'retry_policy_back_off')
      ), 'retry_policy'),
      f('JWKSCluster', struct(
        f('DiscoveryType', str, 'discovery_type'),
        f('TLSCertificates', struct(
          f('CaCertificateProviderInstance', struct(f('InstanceName', str, 'instance_name'), f('CertificateName', str, 'certificate_name')), 'ca_certificate_provider_instance'),
          f('TrustedCA', struct(f('Filename', str), f('EnvironmentVariable', str, 'environment_variable'), f('InlineString', str, 'inline_string'), f('InlineBytes', str, 'inline_bytes')), 'trusted_ca')
        ), 'tls_certificates'),
        f('ConnectTimeout', duration, 'connect_timeout')
      ), 'jwks_cluster')
    ))
  ), 'json_web_key_set'),
  f('Issuer', str), f('Audiences', slice(str)),
  f('Locations', slice(struct(
    f('Header', struct(f('Name', str), f('ValuePrefix', str, 'value_prefix'), f('Forward', bool))),
    f('QueryParam', struct(f('Name', str)), 'query_param'),
    f('Cookie', struct(f('Name', str)))
  ))),
  f('Forwarding', struct(f('HeaderName', str, 'header_name'), f('PadForwardPayloadHeader', bool, 'pad_forward_payload_header'))),
  f('ClockSkewSeconds', int, 'clock_skew_seconds'),
  f('CacheConfig', struct(f('Size', int))),
  f('Meta', stringMap), f('Hash', uint)
)
const directionalTLSSpec = struct(f('TLSMinVersion', str, 'tls_min_version'), f('TLSMaxVersion', str, 'tls_max_version'), f('CipherSuites', slice(str), 'cipher_suites'))

const SPECS: Record<string, Spec> = {
  [JWT_PROVIDER]: jwtProviderSpec,
  [SERVICE_INTENTIONS]: struct(
    f('Kind', str), f('Name', str), f('Sources', slice(sourceSpec)), f('JWT', jwtSpec), f('Meta', stringMap), f('Hash', uint)
  ),
  [SERVICE_DEFAULTS]: struct(
    f('Kind', str), f('Name', str), f('Protocol', str), f('Mode', str), f('TransparentProxy', transparentProxySpec, 'transparent_proxy'),
    f('MutualTLSMode', str, 'mutual_tls_mode'), f('MeshGateway', meshGatewaySpec, 'mesh_gateway'), f('Expose', exposeSpec),
    f('ExternalSNI', str, 'external_sni'), f('UpstreamConfig', any, 'upstream_config'), f('Destination', any),
    f('MaxInboundConnections', int, 'max_inbound_connections'), f('LocalConnectTimeoutMs', int, 'local_connect_timeout_ms'),
    f('LocalRequestTimeoutMs', int, 'local_request_timeout_ms'), f('BalanceInboundConnections', str, 'balance_inbound_connections'),
    f('RateLimits', any, 'rate_limits'), f('EnvoyExtensions', any, 'envoy_extensions'), f('Meta', stringMap), f('Hash', uint)
  ),
  [PROXY_DEFAULTS]: struct(
    f('Kind', str), f('Name', str), f('Config', anyMap), f('Mode', str), f('TransparentProxy', transparentProxySpec, 'transparent_proxy'),
    f('MutualTLSMode', str, 'mutual_tls_mode'), f('MeshGateway', meshGatewaySpec, 'mesh_gateway'), f('Expose', exposeSpec),
    f('AccessLogs', any, 'access_logs'), f('EnvoyExtensions', any, 'envoy_extensions'), f('FailoverPolicy', any, 'failover_policy'),
    f('PrioritizeByLocality', any, 'prioritize_by_locality'), f('Meta', stringMap), f('Hash', uint)
  ),
  // The mesh entry has neither Kind nor Name fields: `Kind` is skipped as an unused key and
  // `Name` is an unknown key, in 1.10 and in current Consul alike.
  [MESH]: struct(
    f('TransparentProxy', struct(f('MeshDestinationsOnly', bool, 'mesh_destinations_only')), 'transparent_proxy'),
    f('AllowEnablingPermissiveMutualTLS', bool, 'allow_enabling_permissive_mutual_tls'),
    f('ValidateClusters', bool, 'validate_clusters'),
    f('TLS', struct(f('Incoming', directionalTLSSpec), f('Outgoing', directionalTLSSpec))),
    f('HTTP', struct(
      f('SanitizeXForwardedClientCert', bool, 'sanitize_x_forwarded_client_cert'),
      f('Incoming', struct(f('RequestNormalization', struct(
        f('InsecureDisablePathNormalization', bool, 'insecure_disable_path_normalization'),
        f('MergeSlashes', bool, 'merge_slashes'),
        f('PathWithEscapedSlashesAction', str, 'path_with_escaped_slashes_action'),
        f('HeadersWithUnderscoresAction', str, 'headers_with_underscores_action')
      ), 'request_normalization')))
    )),
    f('Peering', struct(f('PeerThroughMeshGateways', bool, 'peer_through_mesh_gateways'))),
    f('Meta', stringMap), f('Hash', uint)
  )
}

type Obj = Record<string, unknown>

interface DecodeContext { errors: string[], unused: string[] }

function isObject (value: unknown): value is Obj {
  return typeof value === 'object' && value !== null && !Array.isArray(value)
}

/** Go's name for the type of a list or object that a scalar field cannot take. */
function goType (value: unknown): string {
  return Array.isArray(value) ? '[]interface {}' : 'map[string]interface {}'
}

/** Go's reflect.Kind name of a non-object JSON value. */
function goKind (value: unknown): string {
  if (Array.isArray(value)) return 'slice'
  return typeof value === 'number' ? 'float64' : typeof value
}

/** Go's `%v` of a decoded JSON value. */
function goValue (value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(goValue).join(' ')}]`
  if (isObject(value)) return `map[${Object.keys(value).sort().map((k) => `${k}:${goValue(value[k])}`).join(' ')}]`
  return value === null ? '<nil>' : String(value)
}

function join (path: string, name: string): string {
  return path === '' ? name : `${path}.${name}`
}

/** Go's strconv.ParseBool. */
function parseBool (text: string): boolean | null {
  if (['1', 't', 'T', 'TRUE', 'true', 'True'].includes(text)) return true
  if (['0', 'f', 'F', 'FALSE', 'false', 'False'].includes(text)) return false
  return null
}

function decode (value: unknown, spec: Spec, path: string, ctx: DecodeContext): unknown {
  // HookWeakDecodeFromSlice: a one-element list stands for its element when the target is not a list.
  if (spec.t !== 'slice' && Array.isArray(value) && value.length === 1) value = value[0]
  if (value === null || value === undefined) return undefined
  const unconvertible = (target: string): undefined => {
    ctx.errors.push(`'${path}' expected type '${target}', got unconvertible type '${goType(value)}', value: '${goValue(value)}'`)
    return undefined
  }
  switch (spec.t) {
    case 'any':
      return value
    case 'string':
      if (typeof value === 'string') return value
      if (typeof value === 'boolean') return value ? '1' : '0'
      if (typeof value === 'number') return String(value)
      return unconvertible('string')
    case 'bool':
      if (typeof value === 'boolean') return value
      if (typeof value === 'number') return value !== 0
      if (typeof value === 'string') {
        const parsed = value === '' ? false : parseBool(value)
        if (parsed !== null) return parsed
        ctx.errors.push(`cannot parse '${path}' as bool: strconv.ParseBool: parsing ${goQuote(value)}: invalid syntax`)
        return undefined
      }
      return unconvertible('bool')
    case 'int':
    case 'uint': {
      const target = spec.t === 'int' ? 'int' : 'uint64'
      let number: number
      if (typeof value === 'number') number = Math.trunc(value)
      else if (typeof value === 'boolean') number = value ? 1 : 0
      else if (typeof value === 'string') {
        const text = value === '' ? '0' : value
        if (!/^[+-]?\d+$/.test(text)) {
          ctx.errors.push(`cannot parse '${path}' as ${spec.t}: strconv.Parse${spec.t === 'int' ? 'Int' : 'Uint'}: parsing ${goQuote(value)}: invalid syntax`)
          return undefined
        }
        number = Number(text)
      } else return unconvertible(target)
      if (spec.t === 'uint' && number < 0) {
        ctx.errors.push(`cannot parse '${path}', ${number} overflows uint`)
        return undefined
      }
      return number
    }
    case 'duration': {
      if (typeof value === 'number') return Math.trunc(value)
      // Weakly typed input: a boolean is an int64 of 1 or 0 nanoseconds.
      if (typeof value === 'boolean') return value ? 1 : 0
      const ns = typeof value === 'string' ? parseGoDurationNs(value) : null
      if (ns === null) {
        if (typeof value === 'string') ctx.errors.push(`error decoding '${path}': time: invalid duration ${goQuote(value)}`)
        else return unconvertible('int64')
        return undefined
      }
      return Number(ns)
    }
    case 'stringMap':
    case 'anyMap': {
      if (!isObject(value)) {
        ctx.errors.push(`'${path}' expected a map, got '${goKind(value)}'`)
        return undefined
      }
      if (spec.t === 'anyMap') return value
      const out: Record<string, string> = {}
      for (const [key, item] of Object.entries(value)) {
        const decoded = decode(item, str, `${path}[${key}]`, ctx)
        out[key] = decoded === undefined ? '' : decoded as string
      }
      return out
    }
    case 'slice': {
      let items: unknown[]
      if (Array.isArray(value)) items = value
      else if (isObject(value) && Object.keys(value).length === 0) items = []
      else items = [value] // weakly typed input lifts a single value into a list
      return items.map((item, i) => {
        const decoded = decode(item, spec.of, `${path}[${i}]`, ctx)
        // A null list element is the element type's zero value.
        return decoded === undefined && spec.of.t === 'struct' ? {} : decoded
      })
    }
    case 'struct': {
      if (!isObject(value)) {
        ctx.errors.push(`'${path}' expected a map, got '${goKind(value)}'`)
        return undefined
      }
      return decodeStruct(value, spec.fields, path, ctx)
    }
  }
}

function decodeStruct (input: Obj, fields: Field[], path: string, ctx: DecodeContext): Obj {
  // HookTranslateKeys: an alias (any case) is renamed to its field; the field's own key wins.
  const raw: Obj = {}
  const aliases = new Map(fields.filter((field) => field.alias !== undefined).map((field) => [field.alias as string, field.name]))
  for (const [key, value] of Object.entries(input)) {
    const canonical = aliases.get(key.toLowerCase())
    if (canonical === undefined) {
      raw[key] = value
    } else if (!Object.hasOwn(input, canonical)) {
      raw[canonical] = value
    }
  }
  const used = new Set<string>()
  const out: Obj = {}
  for (const field of fields) {
    // mapstructure: the exact key first, then a case-insensitive match.
    const key = Object.hasOwn(raw, field.name)
      ? field.name
      : Object.keys(raw).find((k) => !used.has(k) && k.toLowerCase() === field.name.toLowerCase())
    if (key === undefined) continue
    used.add(key)
    const decoded = decode(raw[key], field.spec, join(path, field.name), ctx)
    if (decoded !== undefined) out[field.name] = decoded
  }
  for (const key of Object.keys(raw)) {
    if (!used.has(key)) ctx.unused.push(join(path, key))
  }
  return out
}

/** go-multierror's list format. */
export function multiError (errors: string[]): string {
  if (errors.length === 1) return `1 error occurred:\n\t* ${errors[0] as string}\n\n`
  return `${errors.length} errors occurred:\n\t${errors.map((e) => `* ${e}`).join('\n\t')}\n\n`
}

/** Go's `%q` for the strings Consul quotes in its messages. */
export function goQuote (text: string): string {
  let out = '"'
  for (const ch of text) {
    const code = ch.codePointAt(0) as number
    if (ch === '"' || ch === '\\') out += `\\${ch}`
    else if (ch === '\n') out += '\\n'
    else if (ch === '\t') out += '\\t'
    else if (ch === '\r') out += '\\r'
    else if (code < 0x20 || code === 0x7f) out += `\\x${code.toString(16).padStart(2, '0')}`
    else out += ch
  }
  return `${out}"`
}

function decodeError (message: string): DevAgentHttpError {
  return new DevAgentHttpError(400, `Bad request: Request decoding failed: ${message}`)
}

/** Consul's `DecodeConfigEntry`: the kind picks the schema; type errors, then unknown keys, are a 400. */
export function decodeConfigEntry (body: unknown): { kind: string, entry: Obj } {
  if (!isObject(body)) {
    throw decodeError(`json: cannot unmarshal ${Array.isArray(body) ? 'array' : body === null ? 'null' : typeof body} into Go value of type map[string]interface {}`)
  }
  const kind = Object.hasOwn(body, 'Kind') ? body.Kind : body.kind
  if (kind === undefined) throw decodeError('Payload does not contain a kind/Kind key at the top level')
  if (typeof kind !== 'string') throw decodeError('Kind value in payload is not a string')
  if (UNSUPPORTED_KINDS.has(kind)) throw decodeError(`config entry kind "${kind}" is not supported by the fastify-consul-native dev agent`)
  const spec = SPECS[kind]
  if (spec === undefined) throw decodeError(`invalid config entry kind: ${kind}`)
  const ctx: DecodeContext = { errors: [], unused: [] }
  const entry = decode(body, spec, '', ctx) as Obj
  if (ctx.errors.length > 0) {
    const points = ctx.errors.map((e) => `* ${e}`).sort()
    throw decodeError(`${points.length} error(s) decoding:\n\n${points.join('\n')}`)
  }
  const invalid = ctx.unused
    .filter((key) => !['kind', 'Kind', 'CreateIndex', 'ModifyIndex'].includes(key))
    .map((key) => `invalid config key ${goQuote(key)}`)
  if (invalid.length > 0) throw decodeError(multiError(invalid))
  return { kind, entry }
}

// ---------------------------------------------------------------------------------------------
// Typed views of decoded entries (Go zero values for absent fields).

interface HeaderPermission {
  Name: string
  Present: boolean
  Exact: string
  Prefix: string
  Suffix: string
  Contains: string
  Regex: string
  Invert: boolean
  IgnoreCase: boolean
}
interface HTTPPermission { PathExact: string, PathPrefix: string, PathRegex: string, Header: HeaderPermission[], Methods: string[] }
interface JWTClaim { Path: string[], Value: string }
interface JWTRequirement { Providers: Array<{ Name: string, VerifyClaims: JWTClaim[] }> }
interface Permission { Action: string, HTTP: HTTPPermission | null, JWT: JWTRequirement | null }
interface SourceIntention {
  Name: string
  Action: string
  Permissions: Permission[]
  Precedence: number
  Type: string
  Description: string
  LegacyMeta: Record<string, string>
  Peer: string
  SamenessGroup: string
}
interface IntentionsEntry { Name: string, Sources: SourceIntention[], JWT: JWTRequirement | null, Meta: Record<string, string> }

const s = (o: Obj, k: string): string => (o[k] as string | undefined) ?? ''
const b = (o: Obj, k: string): boolean => (o[k] as boolean | undefined) ?? false
const n = (o: Obj, k: string): number => (o[k] as number | undefined) ?? 0
const list = (o: Obj, k: string): Obj[] => (o[k] as Obj[] | undefined) ?? []
const strings = (o: Obj, k: string): string[] => ((o[k] as Array<string | undefined> | undefined) ?? []).map((v) => v ?? '')
const smap = (o: Obj, k: string): Record<string, string> => (o[k] as Record<string, string> | undefined) ?? {}
const sub = (o: Obj, k: string): Obj | null => (o[k] as Obj | undefined) ?? null

function toJWT (o: Obj | null): JWTRequirement | null {
  if (o === null) return null
  return {
    Providers: list(o, 'Providers').map((p) => ({
      Name: s(p, 'Name'),
      VerifyClaims: list(p, 'VerifyClaims').map((c) => ({ Path: strings(c, 'Path'), Value: s(c, 'Value') }))
    }))
  }
}

function toIntentionsEntry (o: Obj): IntentionsEntry {
  return {
    Name: s(o, 'Name'),
    JWT: toJWT(sub(o, 'JWT')),
    Meta: smap(o, 'Meta'),
    Sources: list(o, 'Sources').map((src) => ({
      Name: s(src, 'Name'),
      Action: s(src, 'Action'),
      Precedence: n(src, 'Precedence'),
      Type: s(src, 'Type'),
      Description: s(src, 'Description'),
      LegacyMeta: smap(src, 'LegacyMeta'),
      Peer: s(src, 'Peer'),
      SamenessGroup: s(src, 'SamenessGroup'),
      Permissions: list(src, 'Permissions').map((perm) => {
        const http = sub(perm, 'HTTP')
        return {
          Action: s(perm, 'Action'),
          JWT: toJWT(sub(perm, 'JWT')),
          HTTP: http === null
            ? null
            : {
                PathExact: s(http, 'PathExact'),
                PathPrefix: s(http, 'PathPrefix'),
                PathRegex: s(http, 'PathRegex'),
                Methods: strings(http, 'Methods'),
                Header: list(http, 'Header').map((h) => ({
                  Name: s(h, 'Name'),
                  Present: b(h, 'Present'),
                  Exact: s(h, 'Exact'),
                  Prefix: s(h, 'Prefix'),
                  Suffix: s(h, 'Suffix'),
                  Contains: s(h, 'Contains'),
                  Regex: s(h, 'Regex'),
                  Invert: b(h, 'Invert'),
                  IgnoreCase: b(h, 'IgnoreCase')
                }))
              }
        }
      })
    }))
  }
}

// ---------------------------------------------------------------------------------------------
// Normalisation and validation (run in that order, as Consul's ConfigEntry.Apply does).

function invalid (message: string): DevAgentHttpError {
  // Consul returns semantic validation errors as plain errors: 500 with the bare message.
  return new DevAgentHttpError(500, message)
}

/** CE precedence (docs/semantics.md#precedence-numbers): every namespace is `default`, so only the names count. */
function precedence (destination: string, source: string): number {
  const max = destination === WILDCARD ? 6 : 9
  return max - (source === WILDCARD ? 1 : 0)
}

function normalizeIntentions (entry: IntentionsEntry): void {
  for (const src of entry.Sources) {
    if (src.Type === '') src.Type = 'consul'
    src.Precedence = precedence(entry.Name, src.Name)
    for (const perm of src.Permissions) {
      if (perm.HTTP !== null) perm.HTTP.Methods = perm.HTTP.Methods.map((m) => m.toUpperCase())
    }
  }
  // Stable sort, highest precedence first; the validation indexes below refer to this order.
  entry.Sources = entry.Sources
    .map((src, i) => ({ src, i }))
    .sort((x, y) => y.src.Precedence - x.src.Precedence || x.i - y.i)
    .map(({ src }) => src)
}

function validateMeta (meta: Record<string, string>): void {
  const errors: string[] = []
  if (Object.keys(meta).length > META_MAX_PAIRS) errors.push(`Meta exceeds maximum element count ${META_MAX_PAIRS}`)
  for (const [key, value] of Object.entries(meta)) {
    if (key.length > META_KEY_MAX) errors.push(`Meta key ${goQuote(key)} exceeds maximum length ${META_KEY_MAX}`)
    if (value.length > META_VALUE_MAX) errors.push(`Meta value for key ${goQuote(key)} exceeds maximum length ${META_VALUE_MAX}`)
  }
  if (errors.length > 0) throw invalid(multiError(errors))
}

function validateJWT (jwt: JWTRequirement | null): void {
  if (jwt === null) return
  const errors = jwt.Providers.filter((p) => p.Name === '').map(() => 'JWT provider name is required')
  if (errors.length > 0) throw invalid(multiError(errors))
}

function validateWildcards (name: string): string | null {
  if (name !== WILDCARD && name.includes(WILDCARD)) return 'Name: wildcard character \'*\' cannot be used with partial values'
  return null
}

function validatePermission (perm: Permission, i: number, j: number): void {
  if (perm.Action !== 'allow' && perm.Action !== 'deny') {
    throw invalid(`Sources[${i}].Permissions[${j}].Action must be set to 'allow' or 'deny'`)
  }
  const prefix = `Sources[${i}].Permissions[${j}].HTTP`
  const http = perm.HTTP
  if (http === null) throw invalid(`${prefix} is required`)
  let parts = 0
  for (const key of ['PathExact', 'PathPrefix'] as const) {
    if (http[key] !== '') {
      parts++
      if (!http[key].startsWith('/')) throw invalid(`${prefix}.${key} doesn't start with '/': ${goQuote(http[key])}`)
    }
  }
  // PathRegex is not checked at all, not even for a leading '/' (docs/semantics.md#config-entry-writes).
  if (http.PathRegex !== '') parts++
  if (parts > 1) throw invalid(`${prefix} should only contain at most one of PathExact, PathPrefix, or PathRegex`)
  http.Header.forEach((hdr, k) => {
    if (hdr.Name === '') throw invalid(`${prefix}.Header[${k}] missing required Name field`)
    // An empty string or `false` counts as unset.
    const set = [hdr.Present, hdr.Exact !== '', hdr.Regex !== '', hdr.Prefix !== '', hdr.Suffix !== '', hdr.Contains !== '']
    if (set.filter(Boolean).length !== 1) {
      // Current Consul's wording, which adds Contains to 1.10's list.
      throw invalid(`${prefix}.Header[${k}] should only contain one of Present, Exact, Prefix, Suffix, Contains, or Regex`)
    }
    if (hdr.IgnoreCase && (hdr.Present || hdr.Regex !== '')) {
      // 1.20.1+: IgnoreCase applies to string matchers only (the wording is not from a capture).
      throw invalid(`${prefix}.Header[${k}] should set one of Exact, Prefix, Suffix, or Contains when using IgnoreCase`)
    }
    parts++
  })
  if (http.Methods.length > 0) {
    const seen = new Set<string>()
    for (const method of http.Methods) {
      if (!HTTP_METHODS.has(method)) throw invalid(`${prefix}.Methods contains an invalid method ${goQuote(method)}`)
      if (seen.has(method)) throw invalid(`${prefix}.Methods contains ${goQuote(method)} more than once`)
      seen.add(method)
    }
    parts++
  }
  if (parts === 0) throw invalid(`${prefix} should not be empty`)
  validateJWT(perm.JWT)
}

function validateIntentions (entry: IntentionsEntry): void {
  if (entry.Name === '') throw invalid('Name is required')
  const wildcardError = validateWildcards(entry.Name)
  if (wildcardError !== null) throw invalid(wildcardError)
  const destinationIsWild = entry.Name === WILDCARD
  validateJWT(entry.JWT)
  validateMeta(entry.Meta)
  if (entry.Sources.length === 0) throw invalid('At least one source is required')
  const seen = new Set<string>()
  entry.Sources.forEach((src, i) => {
    if (src.Name === '') throw invalid(`Sources[${i}].Name is required`)
    // CE has no sameness groups (the wording is not from a capture).
    if (src.SamenessGroup !== '') throw invalid(`Sources[${i}].SamenessGroup: Sameness groups are a Consul Enterprise feature. `)
    const sourceWildcard = validateWildcards(src.Name)
    if (sourceWildcard !== null) throw invalid(`Sources[${i}].${sourceWildcard}`)
    if (src.Peer.includes(WILDCARD)) throw invalid(`Sources[${i}].Peer: cannot use wildcard '*' in peer`)
    if (src.Description.length > META_VALUE_MAX) throw invalid(`Sources[${i}].Description exceeds maximum length ${META_VALUE_MAX}`)
    if (Object.keys(src.LegacyMeta).length > 0) throw invalid(`Sources[${i}].LegacyMeta must be omitted`)
    if (src.Permissions.length === 0 && src.Action !== 'allow' && src.Action !== 'deny') {
      throw invalid(`Sources[${i}].Action must be set to 'allow' or 'deny'`)
    }
    if (src.Permissions.length > 0 && src.Action !== '') throw invalid(`Sources[${i}].Action must be omitted if Permissions are specified`)
    if (destinationIsWild && src.Permissions.length > 0) {
      throw invalid(`Sources[${i}].Permissions cannot be specified on intentions with wildcarded destinations`)
    }
    if (src.Type !== 'consul') throw invalid(`Sources[${i}].Type must be set to 'consul'`)
    src.Permissions.forEach((perm, j) => validatePermission(perm, i, j))
    const key = `${src.Peer}\u0000${src.Name}`
    if (seen.has(key)) {
      throw invalid(src.Peer === ''
        ? `Sources[${i}] defines ${goQuote(src.Name)} more than once`
        : `Sources[${i}] defines peer(${goQuote(src.Peer)}) ${goQuote(src.Name)} more than once`)
    }
    seen.add(key)
  })
}

function validateMesh (entry: Obj): void {
  validateMeta(smap(entry, 'Meta'))
  const normalization = sub(sub(sub(entry, 'HTTP') ?? {}, 'Incoming') ?? {}, 'RequestNormalization')
  if (normalization === null) return
  // 1.20.1+ enumerations; the wording of these two messages is not from a capture.
  const escaped = s(normalization, 'PathWithEscapedSlashesAction')
  if (!ESCAPED_SLASHES_ACTIONS.has(escaped)) throw invalid(`no matching PathWithEscapedSlashesAction value found for ${escaped}`)
  const underscores = s(normalization, 'HeadersWithUnderscoresAction')
  if (!UNDERSCORES_ACTIONS.has(underscores)) throw invalid(`no matching HeadersWithUnderscoresAction value found for ${underscores}`)
}

// ---------------------------------------------------------------------------------------------
// Rendering with Go's field order and `omitempty` rules.

type Json = Record<string, unknown>

function put (out: Json, key: string, value: unknown, keep: boolean): void {
  if (keep) out[key] = value
}

function renderJWT (jwt: JWTRequirement): IntentionJWTRequirement {
  const out: IntentionJWTRequirement = {}
  if (jwt.Providers.length > 0) {
    out.Providers = jwt.Providers.map((p) => {
      const provider: Json = {}
      put(provider, 'Name', p.Name, p.Name !== '')
      put(provider, 'VerifyClaims', p.VerifyClaims.map((c) => {
        const claim: Json = {}
        put(claim, 'Path', c.Path, c.Path.length > 0)
        put(claim, 'Value', c.Value, c.Value !== '')
        return claim
      }), p.VerifyClaims.length > 0)
      return provider as { Name: string }
    })
  }
  return out
}

function renderPermission (perm: Permission): IntentionPermission {
  const out: Json = { Action: perm.Action }
  if (perm.HTTP !== null) {
    const h = perm.HTTP
    const http: Json = {}
    put(http, 'PathExact', h.PathExact, h.PathExact !== '')
    put(http, 'PathPrefix', h.PathPrefix, h.PathPrefix !== '')
    put(http, 'PathRegex', h.PathRegex, h.PathRegex !== '')
    put(http, 'Header', h.Header.map((hdr) => {
      const header: Json = { Name: hdr.Name }
      put(header, 'Present', true, hdr.Present)
      put(header, 'Exact', hdr.Exact, hdr.Exact !== '')
      put(header, 'Prefix', hdr.Prefix, hdr.Prefix !== '')
      put(header, 'Suffix', hdr.Suffix, hdr.Suffix !== '')
      put(header, 'Contains', hdr.Contains, hdr.Contains !== '')
      put(header, 'Regex', hdr.Regex, hdr.Regex !== '')
      put(header, 'Invert', true, hdr.Invert)
      put(header, 'IgnoreCase', true, hdr.IgnoreCase)
      return header
    }), h.Header.length > 0)
    put(http, 'Methods', h.Methods, h.Methods.length > 0)
    out.HTTP = http
  }
  if (perm.JWT !== null) out.JWT = renderJWT(perm.JWT)
  return out as unknown as IntentionPermission
}

function renderIntentionsEntry (e: IntentionsEntry): Json {
  const out: Json = { Kind: SERVICE_INTENTIONS, Name: e.Name }
  out.Sources = e.Sources.map((src) => {
    const o: Json = { Name: src.Name }
    put(o, 'Action', src.Action, src.Action !== '')
    put(o, 'Permissions', src.Permissions.map(renderPermission), src.Permissions.length > 0)
    o.Precedence = src.Precedence
    o.Type = src.Type
    put(o, 'Description', src.Description, src.Description !== '')
    put(o, 'Peer', src.Peer, src.Peer !== '')
    return o
  })
  if (e.JWT !== null) out.JWT = renderJWT(e.JWT)
  put(out, 'Meta', e.Meta, Object.keys(e.Meta).length > 0)
  return out
}

function renderStruct (o: Obj | null, keys: string[]): Json {
  const out: Json = {}
  for (const key of keys) {
    const value = o?.[key]
    if (value !== undefined && value !== '' && value !== 0 && value !== false && !(Array.isArray(value) && value.length === 0)) out[key] = value
  }
  return out
}

function renderExpose (o: Obj | null): Json {
  const out = renderStruct(o, ['Checks'])
  const paths = o === null ? [] : list(o, 'Paths')
  if (paths.length > 0) out.Paths = paths.map((p) => renderStruct(p, ['ListenerPort', 'Path', 'LocalPathPort', 'Protocol', 'ParsedFromCheck']))
  return out
}

/** The proxy fields shared by service-defaults and proxy-defaults, in Go order. */
function renderProxyFields (out: Json, e: Obj): void {
  Object.assign(out, renderStruct(e, ['Mode']))
  out.TransparentProxy = renderStruct(sub(e, 'TransparentProxy'), ['OutboundListenerPort', 'DialedDirectly'])
  Object.assign(out, renderStruct(e, ['MutualTLSMode']))
  out.MeshGateway = renderStruct(sub(e, 'MeshGateway'), ['Mode'])
  out.Expose = renderExpose(sub(e, 'Expose'))
}

function renderServiceDefaults (e: Obj): Json {
  const out: Json = { Kind: SERVICE_DEFAULTS, Name: s(e, 'Name'), Protocol: s(e, 'Protocol') }
  renderProxyFields(out, e)
  Object.assign(out, renderStruct(e, [
    'ExternalSNI', 'UpstreamConfig', 'Destination', 'MaxInboundConnections', 'LocalConnectTimeoutMs',
    'LocalRequestTimeoutMs', 'BalanceInboundConnections', 'RateLimits', 'EnvoyExtensions'
  ]))
  put(out, 'Meta', e.Meta, Object.keys(smap(e, 'Meta')).length > 0)
  return out
}

function renderProxyDefaults (e: Obj): Json {
  const out: Json = { Kind: PROXY_DEFAULTS, Name: s(e, 'Name'), Config: e.Config ?? null }
  renderProxyFields(out, e)
  Object.assign(out, renderStruct(e, ['AccessLogs', 'EnvoyExtensions', 'FailoverPolicy', 'PrioritizeByLocality']))
  put(out, 'Meta', e.Meta, Object.keys(smap(e, 'Meta')).length > 0)
  return out
}

function renderMesh (e: Obj): Json {
  // Consul's MeshConfigEntry.MarshalJSON adds Kind; the entry has no Name field.
  const out: Json = { Kind: MESH, TransparentProxy: { MeshDestinationsOnly: b(sub(e, 'TransparentProxy') ?? {}, 'MeshDestinationsOnly') } }
  Object.assign(out, renderStruct(e, ['AllowEnablingPermissiveMutualTLS', 'ValidateClusters']))
  const tls = sub(e, 'TLS')
  if (tls !== null) {
    const directions: Json = {}
    for (const direction of ['Incoming', 'Outgoing']) {
      const d = sub(tls, direction)
      if (d !== null) directions[direction] = renderStruct(d, ['TLSMinVersion', 'TLSMaxVersion', 'CipherSuites'])
    }
    out.TLS = directions
  }
  const http = sub(e, 'HTTP')
  if (http !== null) {
    const rendered: Json = { SanitizeXForwardedClientCert: b(http, 'SanitizeXForwardedClientCert') }
    const incoming = sub(http, 'Incoming')
    if (incoming !== null) {
      const normalization = sub(incoming, 'RequestNormalization')
      // The server's structs have no omitempty on these: false and "" are sent.
      rendered.Incoming = normalization === null
        ? {}
        : {
            RequestNormalization: {
              InsecureDisablePathNormalization: b(normalization, 'InsecureDisablePathNormalization'),
              MergeSlashes: b(normalization, 'MergeSlashes'),
              PathWithEscapedSlashesAction: s(normalization, 'PathWithEscapedSlashesAction'),
              HeadersWithUnderscoresAction: s(normalization, 'HeadersWithUnderscoresAction')
            }
          }
    }
    out.HTTP = rendered
  }
  const peering = sub(e, 'Peering')
  if (peering !== null) out.Peering = { PeerThroughMeshGateways: b(peering, 'PeerThroughMeshGateways') }
  put(out, 'Meta', e.Meta, Object.keys(smap(e, 'Meta')).length > 0)
  return out
}

// ---------------------------------------------------------------------------------------------
// Intentions as the match endpoint returns them.

function byteCompare (a: string, b: string): number {
  return Buffer.compare(Buffer.from(a), Buffer.from(b))
}

/** Consul's IntentionPrecedenceSorter (docs/semantics.md#precedence). */
export function compareIntentions (a: Intention, b: Intention): number {
  if (a.Precedence !== b.Precedence) return b.Precedence - a.Precedence
  const keys = ['SourceSamenessGroup', 'SourcePeer', 'SourcePartition', 'SourceNS', 'SourceName',
    'DestinationPartition', 'DestinationNS', 'DestinationName'] as const
  for (const key of keys) {
    const order = byteCompare(a[key] ?? '', b[key] ?? '')
    if (order !== 0) return order
  }
  return 0
}

interface Stored {
  kind: string
  name: string
  /** Decoded, normalised entry (typed for service-intentions). */
  entry: Obj
  intentions: IntentionsEntry | null
  createIndex: number
  modifyIndex: number
}

function toIntention (stored: Stored, src: SourceIntention): Intention {
  const e = stored.intentions as IntentionsEntry
  const out: Json = {}
  put(out, 'Description', src.Description, src.Description !== '')
  put(out, 'SourcePeer', src.Peer, src.Peer !== '')
  out.SourceNS = 'default'
  out.SourceName = src.Name
  out.DestinationNS = 'default'
  out.DestinationName = e.Name
  out.SourceType = src.Type
  put(out, 'Action', src.Action, src.Action !== '')
  put(out, 'Permissions', src.Permissions.map(renderPermission), src.Permissions.length > 0)
  if (e.JWT !== null) out.JWT = renderJWT(e.JWT)
  put(out, 'Meta', e.Meta, Object.keys(e.Meta).length > 0)
  out.Precedence = src.Precedence
  out.CreateIndex = stored.createIndex
  out.ModifyIndex = stored.modifyIndex
  return out as unknown as Intention
}

export interface ConfigStoreOptions {
  /** Takes the next Raft-like index for a write. */
  nextIndex: () => number
  /** Called after every write or delete. */
  onChange: (kind: string, name: string) => void
}

/** Parses `?cas=` like Go's strconv.ParseUint; a bad value is a plain (500) error in Consul. */
function parseCas (cas: string): number {
  if (!/^\d+$/.test(cas)) throw new DevAgentHttpError(500, `strconv.ParseUint: parsing ${goQuote(cas)}: invalid syntax`)
  if (BigInt(cas) > 0xffff_ffff_ffff_ffffn) throw new DevAgentHttpError(500, `strconv.ParseUint: parsing ${goQuote(cas)}: value out of range`)
  return Number(cas)
}

/** The dev agent's config-entry table. */
export class ConfigEntryStore {
  #entries = new Map<string, Stored>()
  #tableIndex = 0
  readonly #opts: ConfigStoreOptions

  constructor (opts: ConfigStoreOptions) {
    this.#opts = opts
  }

  /** The index of the last write or delete of any entry (Consul's config-entries table index). */
  get tableIndex (): number {
    return this.#tableIndex
  }

  /**
   * `PUT /v1/config`: decode (400), normalise, validate (500), ACL, CAS, then the L7/protocol check
   * across entries (500). Returns the body Consul answers: `true`, or `false` for a failed CAS.
   */
  apply (body: unknown, cas: string | null, authorize: (kind: string, name: string) => void): boolean {
    const { kind, entry } = decodeConfigEntry(body)
    const casIndex = cas === null || cas === '' ? null : parseCas(cas)
    let intentions: IntentionsEntry | null = null
    let name: string
    if (kind === SERVICE_INTENTIONS) {
      intentions = toIntentionsEntry(entry)
      normalizeIntentions(intentions)
      validateIntentions(intentions)
      name = intentions.Name
    } else if (kind === SERVICE_DEFAULTS) {
      name = s(entry, 'Name')
      entry.Protocol = s(entry, 'Protocol').toLowerCase()
      if (name === '') throw invalid('Name is required')
      if (name === WILDCARD) throw invalid('service-defaults name must be the name of a service, and not a wildcard')
      validateMeta(smap(entry, 'Meta'))
    } else if (kind === PROXY_DEFAULTS) {
      // Any name is stored as `global` (docs/semantics.md#config-entry-writes).
      name = 'global'
      entry.Name = name
      validateMeta(smap(entry, 'Meta'))
    } else if (kind === JWT_PROVIDER) {
      name = s(entry, 'Name')
      // Normalize (ClockSkewSeconds 0 → 30), then Validate, as Consul does (docs/semantics.md#config-entry-writes).
      if (n(entry, 'ClockSkewSeconds') === 0) entry.ClockSkewSeconds = 30
      validateJwtProvider(entry, invalid, () => validateMeta(smap(entry, 'Meta')))
    } else {
      name = MESH
      validateMesh(entry)
    }
    // Consul's ConfigEntry.Apply checks the token after normalising and validating the entry.
    authorize(kind, name)
    const key = `${kind}/${name}`
    const existing = this.#entries.get(key)
    if (casIndex !== null && (casIndex === 0 ? existing !== undefined : existing?.modifyIndex !== casIndex)) return false
    const proposed = new Map(this.#entries)
    proposed.set(key, { kind, name, entry, intentions, createIndex: 0, modifyIndex: 0 })
    if (intentions !== null) this.#checkProvidersExist(intentions)
    this.#checkL7(proposed, kind === SERVICE_INTENTIONS ? [name] : kind === MESH ? [] : this.#l7Affected(kind, name))
    const index = this.#opts.nextIndex()
    this.#entries.set(key, { kind, name, entry, intentions, createIndex: existing?.createIndex ?? index, modifyIndex: index })
    this.#tableIndex = index
    this.#opts.onChange(kind, name)
    return true
  }

  /** `GET /v1/config/:kind/:name`: the rendered entry, or null when absent. */
  get (kind: string, name: string): Json | null {
    this.#checkKind(kind, 500)
    const stored = this.#entries.get(`${kind}/${name}`)
    return stored === undefined ? null : this.#render(stored)
  }

  /** `GET /v1/config/:kind` (all kinds for an empty kind), sorted by name. */
  list (kind: string): Json[] {
    if (kind !== '') this.#checkKind(kind, 500)
    return [...this.#entries.values()]
      .filter((stored) => kind === '' || stored.kind === kind)
      .sort((x, y) => byteCompare(x.kind, y.kind) || byteCompare(x.name, y.name))
      .map((stored) => this.#render(stored))
  }

  /**
   * `DELETE /v1/config/:kind/:name`. Returns whether an entry was deleted for a CAS delete, and
   * undefined otherwise (Consul then answers `{}`, also for a missing entry).
   */
  delete (kind: string, name: string, cas: string | null): boolean | undefined {
    this.#checkKind(kind, 400)
    // Consul normalises the entry to delete: proxy-defaults is always `global`, mesh always `mesh`.
    const target = kind === PROXY_DEFAULTS ? 'global' : kind === MESH ? MESH : name
    const casIndex = cas === null || cas === '' ? null : parseCas(cas)
    const key = `${kind}/${target}`
    const existing = this.#entries.get(key)
    if (casIndex !== null && existing?.modifyIndex !== casIndex) return false
    if (existing !== undefined) {
      const proposed = new Map(this.#entries)
      proposed.delete(key)
      this.#checkL7(proposed, this.#l7Affected(kind, target))
      const index = this.#opts.nextIndex()
      this.#entries.delete(key)
      this.#tableIndex = index
      this.#opts.onChange(kind, target)
    }
    return casIndex === null ? undefined : true
  }

  /** Consul's state store refuses intentions naming a jwt-provider it does not have (deleting one later is allowed). */
  #checkProvidersExist (entry: IntentionsEntry): void {
    const named = new Set<string>()
    for (const p of entry.JWT?.Providers ?? []) named.add(p.Name)
    for (const src of entry.Sources) for (const perm of src.Permissions) for (const p of perm.JWT?.Providers ?? []) named.add(p.Name)
    const missing = [...named].filter((name) => !this.#entries.has(`${JWT_PROVIDER}/${name}`)).sort()
    if (missing.length > 0) throw invalid(multiError(missing.map((name) => `Referenced JWT Provider does not exist. Provider Name: ${name}`)))
  }

  /** The protocol of a service: service-defaults, then proxy-defaults `Config.protocol`, then `tcp`. */
  #protocolIn (entries: Map<string, Stored>, service: string): string {
    const defaults = entries.get(`${SERVICE_DEFAULTS}/${service}`)
    const own = defaults === undefined ? '' : s(defaults.entry, 'Protocol')
    if (own !== '') return own
    const global = entries.get(`${PROXY_DEFAULTS}/global`)?.entry.Config
    const fromProxy = isObject(global) ? global.protocol : undefined
    return typeof fromProxy === 'string' && fromProxy !== '' ? fromProxy.toLowerCase() : 'tcp'
  }

  /** Intentions whose destination is `name` or `*`, in precedence order (`by=destination`). */
  destinationIntentions (name: string): Intention[] {
    const out: Intention[] = []
    for (const destination of new Set([name, WILDCARD])) {
      const stored = this.#entries.get(`${SERVICE_INTENTIONS}/${destination}`)
      if (stored !== undefined) {
        for (const src of (stored.intentions as IntentionsEntry).Sources) out.push(toIntention(stored, src))
      }
    }
    return out.sort(compareIntentions)
  }

  /** Every intention of every `service-intentions` entry, in precedence order (`GET /v1/connect/intentions`). */
  allIntentions (): Intention[] {
    const out: Intention[] = []
    for (const stored of this.#entries.values()) {
      if (stored.kind !== SERVICE_INTENTIONS) continue
      for (const src of (stored.intentions as IntentionsEntry).Sources) out.push(toIntention(stored, src))
    }
    return out.sort(compareIntentions)
  }

  /** Intentions whose (local) source is `name` or `*`, in precedence order (`by=source`). */
  sourceIntentions (name: string): Intention[] {
    const out: Intention[] = []
    for (const stored of this.#entries.values()) {
      if (stored.kind !== SERVICE_INTENTIONS) continue
      for (const src of (stored.intentions as IntentionsEntry).Sources) {
        if (src.Peer === '' && (src.Name === name || src.Name === WILDCARD)) out.push(toIntention(stored, src))
      }
    }
    return out.sort(compareIntentions)
  }

  /**
   * `GET /v1/connect/intentions/match`: keyed by each `name` exactly as sent; `null` when nothing
   * matches, as Consul's handler passes nil slices through. Bad parameters are plain (500) errors.
   */
  match (by: string[], names: string[]): Record<string, Intention[] | null> {
    if (by.length !== 1) throw new DevAgentHttpError(500, 'required query parameter \'by\' not set')
    const type = by[0]
    if (type !== 'source' && type !== 'destination') {
      throw new DevAgentHttpError(500, '\'by\' parameter must be one of \'source\' or \'destination\'')
    }
    if (names.length === 0) throw new DevAgentHttpError(500, 'required query parameter \'name\' not set')
    const out: Record<string, Intention[] | null> = {}
    for (const raw of names) {
      if (raw.startsWith('peer:')) throw new DevAgentHttpError(500, `name ${goQuote(raw)} is invalid: cannot specify a peer here`)
      const parts = raw.split('/')
      if (parts.length > 3) throw new DevAgentHttpError(500, `name ${goQuote(raw)} is invalid: input can contain at most two '/'`)
      // CE: a partition or namespace in the name is accepted and has no effect.
      const name = parts[parts.length - 1] as string
      const found = type === 'destination' ? this.destinationIntentions(name) : this.sourceIntentions(name)
      out[raw] = found.length === 0 ? null : found
    }
    return out
  }

  #checkKind (kind: string, status: number): void {
    if (!KINDS.includes(kind)) {
      throw new DevAgentHttpError(status, status === 400 ? `Bad request: invalid config entry kind: ${kind}` : `invalid config entry kind: ${kind}`)
    }
  }

  /** Destinations whose L7 intentions depend on a change to this protocol-defining entry. */
  #l7Affected (kind: string, name: string): string[] {
    if (kind === SERVICE_DEFAULTS) return [name]
    if (kind === PROXY_DEFAULTS) {
      return [...this.#entries.values()].filter((e) => e.kind === SERVICE_INTENTIONS).map((e) => e.name).sort(byteCompare)
    }
    return []
  }

  /** L7 permissions need an HTTP-like destination (docs/semantics.md#config-entry-writes). */
  #checkL7 (entries: Map<string, Stored>, destinations: string[]): void {
    for (const destination of destinations) {
      const stored = entries.get(`${SERVICE_INTENTIONS}/${destination}`)
      const e = stored?.intentions
      if (e === undefined || e === null || e.Name === WILDCARD || !e.Sources.some((src) => src.Permissions.length > 0)) continue
      const protocol = this.#protocolIn(entries, destination)
      if (!HTTP_LIKE.has(protocol)) {
        throw invalid(`service ${goQuote(destination)} has protocol ${goQuote(protocol)}, which is incompatible with L7 intentions permissions`)
      }
    }
  }

  #render (stored: Stored): Json {
    let out: Json
    if (stored.kind === SERVICE_INTENTIONS) out = renderIntentionsEntry(stored.intentions as IntentionsEntry)
    else if (stored.kind === SERVICE_DEFAULTS) out = renderServiceDefaults(stored.entry)
    else if (stored.kind === PROXY_DEFAULTS) out = renderProxyDefaults(stored.entry)
    else if (stored.kind === JWT_PROVIDER) out = renderJwtProvider(stored.entry)
    else out = renderMesh(stored.entry)
    out.CreateIndex = stored.createIndex
    out.ModifyIndex = stored.modifyIndex
    return out
  }
}
