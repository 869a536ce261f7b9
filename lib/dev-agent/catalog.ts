// The dev agent's service catalog and check runner: the services registered on the agent (what
// Consul keeps in agent/local state), the health view of them (`/v1/health/connect`), and HTTP,
// TCP and TTL checks run the way agent/checks runs them. Behaviour and messages follow
// hashicorp/consul (agent/agent_endpoint.go, agent/agent.go, agent/structs, agent/checks,
// agent/local/state.go); each place that departs from it says so.
import { createHash, randomUUID } from 'node:crypto'
import * as http from 'node:http'
import * as https from 'node:https'
import type { IncomingMessage } from 'node:http'
import * as net from 'node:net'
import * as tls from 'node:tls'
import { DURATION_UNIT_NS } from './go'
import { DevAgentHttpError } from './http-error'

export type CheckStatus = 'passing' | 'warning' | 'critical'

/** Consul's timing, overridable so tests (and impatient developers) need not wait for it. */
export interface DevCatalogTiming {
  /** Shortest interval an HTTP/TCP check runs at, ms. Consul: 1 s (`checks.MinInterval`). */
  minCheckInterval?: number
  /**
   * Upper bound of the random delay before a check's first run, ms. Consul waits a random part
   * of a whole Interval (`lib.RandomStagger`); the dev agent caps it so a new service turns
   * healthy promptly. Default 250.
   */
  maxFirstRunDelay?: number
  /** Floor for `DeregisterCriticalServiceAfter`, ms. Consul: 1 min (`check_deregister_interval_min`). */
  minDeregisterCriticalAfter?: number
  /** How often services critical for too long are reaped, ms. Consul: 30 s (`check_reap_interval`). */
  reapInterval?: number
}

export interface DevCatalogOptions {
  nodeName: string
  /** Node UUID; random by default, as a dev agent's. */
  nodeId?: string
  datacenter: string
  nodeAddress: string
  /** Returns a new Raft-like index for each change. */
  nextIndex: () => number
  onChange: (what: 'services' | 'health') => void
  timing?: DevCatalogTiming
}

/** Body of the 404 for `GET /v1/agent/service/:id` of an unknown ID (agent_endpoint.go, `AgentService`). */
export function unknownServiceMessage (id: string): string {
  return `unknown service ID: ${id}`
}

type Obj = Record<string, unknown>

/** The Consul version the dev agent emulates: current enough for Contains/IgnoreCase and request normalization. */
export const CONSUL_VERSION = '1.20.1'
// ---------------------------------------------------------------------------------------------
// Decoding like Consul's: encoding/json with DisallowUnknownFields (lib/json.go), whose field
// matching is case-insensitive, and the UnmarshalJSON methods of the structs, which add
// snake_case aliases and decode on a fresh decoder.

interface Level {
  strict: boolean
  /** Go's decoder keeps the first unknown-field or type error and reports it at the end. */
  saved?: string
}

interface Kind {
  k: 'string' | 'int' | 'bool' | 'any' | 'list' | 'map' | 'struct'
  /** Go type, for error messages. */
  go: string
  of?: Kind
  struct?: StructDef
}

interface StructDef {
  name: string
  fields: Record<string, Kind>
  /** `[json name, field]`: a snake_case alias fills the field when the field is empty. */
  aliases?: Array<[string, string]>
  /** Set for types with their own UnmarshalJSON: they decode on a fresh decoder. */
  own?: { strict: boolean, after?: (out: Obj) => void }
}

class DecodeError extends Error {}

const STRING: Kind = { k: 'string', go: 'string' }
const INT: Kind = { k: 'int', go: 'int' }
const BOOL: Kind = { k: 'bool', go: 'bool' }
const ANY: Kind = { k: 'any', go: 'interface {}' }
const listOf = (of: Kind): Kind => ({ k: 'list', go: `[]${of.go}`, of })
const mapOf = (of: Kind): Kind => ({ k: 'map', go: `map[string]${of.go}`, of })
const structOf = (struct: StructDef): Kind => ({ k: 'struct', go: `structs.${struct.name}`, struct })

const isObject = (v: unknown): v is Obj => typeof v === 'object' && v !== null && !Array.isArray(v)

// Go folds names with Unicode simple folding, so the long s and the Kelvin sign match s and k.
const fold = (name: string): string => name.toLowerCase().replaceAll('\u017f', 's')

function lookupField (s: StructDef, key: string): string | undefined {
  const names = [...Object.keys(s.fields), ...(s.aliases ?? []).map(([alias]) => alias)]
  return names.find((name) => name === key) ?? names.find((name) => fold(name) === fold(key))
}

function jsonKind (v: unknown, into: Kind): string {
  if (Array.isArray(v)) return 'array'
  if (typeof v === 'boolean') return 'bool'
  if (typeof v === 'number') return into.k === 'int' ? `number ${v}` : 'number'
  return typeof v
}

function mismatch (v: unknown, into: Kind, where: string, level: Level): undefined {
  level.saved ??= `json: cannot unmarshal ${jsonKind(v, into)} into Go struct field ${where} of type ${into.go}`
  return undefined
}

function decodeValue (kind: Kind, v: unknown, where: string, level: Level): unknown {
  // Go leaves a field as it is when the JSON value is null.
  if (v == null) return undefined
  switch (kind.k) {
    case 'any':
      return v
    case 'string':
      return typeof v === 'string' ? v : mismatch(v, kind, where, level)
    case 'bool':
      return typeof v === 'boolean' ? v : mismatch(v, kind, where, level)
    case 'int':
      return Number.isInteger(v) ? v : mismatch(v, kind, where, level)
    case 'list': {
      if (!Array.isArray(v)) return mismatch(v, kind, where, level)
      const of = kind.of as Kind
      return v.map((item) => decodeValue(of, item, where, level) ?? zeroOf(of))
    }
    case 'map': {
      if (!isObject(v)) return mismatch(v, kind, where, level)
      const of = kind.of as Kind
      return Object.fromEntries(Object.entries(v).map(([key, item]) => [key, decodeValue(of, item, where, level) ?? zeroOf(of)]))
    }
    default:
      return decodeStruct(kind.struct as StructDef, v, where, level)
  }
}

/** What Go stores for a null list element or map value (the schemas have no int or bool ones). */
function zeroOf (kind: Kind): unknown {
  return kind.k === 'string' ? '' : kind.k === 'struct' ? {} : kind.k === 'list' ? [] : null
}

function decodeStruct (s: StructDef, v: unknown, where: string, parent: Level): Obj | undefined {
  if (s.own === undefined) return isObject(v) ? decodeFields(s, v, parent) : mismatch(v, structOf(s), where, parent)
  // An UnmarshalJSON error is returned at once and ends the whole decode.
  if (!isObject(v)) throw new DecodeError(`json: cannot unmarshal ${jsonKind(v, ANY)} into Go value of type structs.${s.name}`)
  const level: Level = { strict: s.own.strict }
  const out = decodeFields(s, v, level)
  if (level.saved !== undefined) throw new DecodeError(level.saved)
  s.own.after?.(out)
  return out
}

function decodeFields (s: StructDef, v: Obj, level: Level): Obj {
  const out: Obj = {}
  const aliased: Obj = {}
  const aliasTargets = new Map(s.aliases)
  for (const [key, raw] of Object.entries(v)) {
    const name = lookupField(s, key)
    if (name === undefined) {
      if (level.strict) level.saved ??= `json: unknown field ${JSON.stringify(key)}`
      continue
    }
    const field = aliasTargets.get(name) ?? name
    const value = decodeValue(s.fields[field] as Kind, raw, `${s.name}.${field}`, level)
    if (value !== undefined) (aliasTargets.has(name) ? aliased : out)[name] = value
  }
  for (const [alias, field] of s.aliases ?? []) {
    // Go fills struct-valued fields field by field; whole values are enough for the dev agent.
    if (aliased[alias] !== undefined && isEmpty(out[field], s.fields[field] as Kind)) out[field] = aliased[alias]
  }
  return out
}

function isEmpty (v: unknown, kind: Kind): boolean {
  if (kind.k === 'any') return v === undefined
  return v === undefined || v === '' || v === 0 || v === false || (typeof v === 'object' && Object.keys(v as object).length === 0)
}

const SERVICE_ADDRESS: StructDef = { name: 'ServiceAddress', fields: { Address: STRING, Port: INT } }
const WEIGHTS: StructDef = { name: 'Weights', fields: { Passing: INT, Warning: INT } }
const LOCALITY: StructDef = { name: 'Locality', fields: { Region: STRING, Zone: STRING } }
const MESH_GATEWAY: StructDef = { name: 'MeshGatewayConfig', fields: { Mode: STRING } }

const DURATION_FIELDS = ['Interval', 'Timeout', 'TTL', 'DeregisterCriticalServiceAfter']

const CHECK_TYPE: StructDef = {
  name: 'CheckType',
  fields: {
    CheckID: STRING,
    Name: STRING,
    Status: STRING,
    Notes: STRING,
    ScriptArgs: listOf(STRING),
    HTTP: STRING,
    H2PING: STRING,
    H2PingUseTLS: BOOL,
    Header: mapOf(listOf(STRING)),
    Method: STRING,
    Body: STRING,
    DisableRedirects: BOOL,
    TCP: STRING,
    TCPUseTLS: BOOL,
    UDP: STRING,
    Interval: ANY,
    AliasNode: STRING,
    AliasService: STRING,
    DockerContainerID: STRING,
    Shell: STRING,
    GRPC: STRING,
    GRPCUseTLS: BOOL,
    OSService: STRING,
    TLSServerName: STRING,
    TLSSkipVerify: BOOL,
    Timeout: ANY,
    TTL: ANY,
    SuccessBeforePassing: INT,
    FailuresBeforeWarning: INT,
    FailuresBeforeCritical: INT,
    ProxyHTTP: STRING,
    ProxyGRPC: STRING,
    DeregisterCriticalServiceAfter: ANY,
    OutputMaxSize: INT,
    // Accepted and ignored, as CheckType.UnmarshalJSON does.
    ServiceID: STRING
  },
  aliases: [
    ['args', 'ScriptArgs'],
    ['script_args', 'ScriptArgs'],
    ['deregister_critical_service_after', 'DeregisterCriticalServiceAfter'],
    ['docker_container_id', 'DockerContainerID'],
    ['tls_server_name', 'TLSServerName'],
    ['tls_skip_verify', 'TLSSkipVerify'],
    ['grpc_use_tls', 'GRPCUseTLS'],
    ['h2ping_use_tls', 'H2PingUseTLS'],
    ['service_id', 'ServiceID']
  ],
  own: {
    strict: true,
    after: (out) => {
      delete out.ServiceID
      // Durations are Go duration strings or numbers of nanoseconds; other JSON types are ignored.
      for (const field of DURATION_FIELDS) {
        const v = out[field]
        if (typeof v === 'string') out[field] = parseDuration(v)
        else out[field] = typeof v === 'number' ? BigInt(Math.trunc(v)) : 0n
      }
    }
  }
}

const UPSTREAM: StructDef = {
  name: 'Upstream',
  fields: {
    DestinationType: STRING,
    DestinationNamespace: STRING,
    DestinationPartition: STRING,
    DestinationPeer: STRING,
    DestinationName: STRING,
    Datacenter: STRING,
    LocalBindAddress: STRING,
    LocalBindPort: INT,
    LocalBindSocketPath: STRING,
    LocalBindSocketMode: STRING,
    Config: mapOf(ANY),
    MeshGateway: structOf(MESH_GATEWAY),
    CentrallyConfigured: BOOL
  },
  aliases: [
    ['destination_type', 'DestinationType'],
    ['destination_partition', 'DestinationPartition'],
    ['destination_namespace', 'DestinationNamespace'],
    ['destination_peer', 'DestinationPeer'],
    ['destination_name', 'DestinationName'],
    ['local_bind_address', 'LocalBindAddress'],
    ['local_bind_port', 'LocalBindPort'],
    ['local_bind_socket_path', 'LocalBindSocketPath'],
    ['local_bind_socket_mode', 'LocalBindSocketMode'],
    ['mesh_gateway', 'MeshGateway']
  ],
  own: { strict: true }
}

const EXPOSE_PATH: StructDef = {
  name: 'ExposePath',
  fields: { ListenerPort: INT, Path: STRING, LocalPathPort: INT, Protocol: STRING, ParsedFromCheck: BOOL },
  aliases: [['listener_port', 'ListenerPort'], ['local_path_port', 'LocalPathPort'], ['parsed_from_check', 'ParsedFromCheck']],
  own: { strict: true }
}

const TRANSPARENT_PROXY: StructDef = { name: 'TransparentProxyConfig', fields: { OutboundListenerPort: INT, DialedDirectly: BOOL } }
const ACCESS_LOGS: StructDef = {
  name: 'AccessLogsConfig',
  fields: { Enabled: BOOL, DisableListenerLogs: BOOL, Type: STRING, Path: STRING, JSONFormat: STRING, TextFormat: STRING }
}
const ENVOY_EXTENSION: StructDef = {
  name: 'EnvoyExtension',
  fields: { Name: STRING, Required: BOOL, Arguments: mapOf(ANY), ConsulVersion: STRING, EnvoyVersion: STRING }
}

const CONNECT_PROXY_CONFIG: StructDef = {
  name: 'ConnectProxyConfig',
  fields: {
    EnvoyExtensions: listOf(structOf(ENVOY_EXTENSION)),
    DestinationServiceName: STRING,
    DestinationServiceID: STRING,
    LocalServiceAddress: STRING,
    LocalServicePort: INT,
    LocalServiceSocketPath: STRING,
    Mode: STRING,
    Config: mapOf(ANY),
    Upstreams: listOf(structOf(UPSTREAM)),
    MeshGateway: structOf(MESH_GATEWAY),
    Expose: structOf({ name: 'ExposeConfig', fields: { Checks: BOOL, Paths: listOf(structOf(EXPOSE_PATH)) } }),
    TransparentProxy: structOf(TRANSPARENT_PROXY),
    AccessLogs: structOf(ACCESS_LOGS)
  },
  aliases: [
    ['destination_service_name', 'DestinationServiceName'],
    ['destination_service_id', 'DestinationServiceID'],
    ['local_service_address', 'LocalServiceAddress'],
    ['local_service_port', 'LocalServicePort'],
    ['local_service_socket_path', 'LocalServiceSocketPath'],
    ['mesh_gateway', 'MeshGateway'],
    ['transparent_proxy', 'TransparentProxy'],
    ['access_logs', 'AccessLogs']
  ],
  own: { strict: true }
}

// ServiceConnect.UnmarshalJSON uses plain json.Unmarshal: unknown keys in `Connect` are ignored.
const SERVICE_CONNECT: StructDef = {
  name: 'ServiceConnect',
  fields: {
    Native: BOOL,
    PeerMeta: structOf({ name: 'PeeringServiceMeta', fields: { SNI: listOf(STRING), SpiffeID: listOf(STRING), Protocol: STRING } })
  },
  aliases: [['sidecar_service', 'SidecarService']],
  own: { strict: false }
}

// Namespace and Partition are absent: CE's acl.EnterpriseMeta is empty, so they are unknown fields.
const SERVICE_DEFINITION: StructDef = {
  name: 'ServiceDefinition',
  fields: {
    Kind: STRING,
    ID: STRING,
    Name: STRING,
    Tags: listOf(STRING),
    Address: STRING,
    TaggedAddresses: mapOf(structOf(SERVICE_ADDRESS)),
    Meta: mapOf(STRING),
    Port: INT,
    SocketPath: STRING,
    Check: structOf(CHECK_TYPE),
    Checks: listOf(structOf(CHECK_TYPE)),
    Weights: structOf(WEIGHTS),
    Token: STRING,
    EnableTagOverride: BOOL,
    Locality: structOf(LOCALITY),
    Proxy: structOf(CONNECT_PROXY_CONFIG),
    Connect: structOf(SERVICE_CONNECT)
  },
  aliases: [['enable_tag_override', 'EnableTagOverride'], ['tagged_addresses', 'TaggedAddresses']],
  own: { strict: true }
}
SERVICE_CONNECT.fields.SidecarService = structOf(SERVICE_DEFINITION)

// ---------------------------------------------------------------------------------------------
// Go durations. blocking.ts parses `wait` too, but registration needs Go's exact error texts.

const MAX_NS = 1n << 63n

/** Go's time.quote: `"` and `\` escaped, bytes outside printable ASCII as `\xNN`. */
function goQuote (s: string): string {
  let out = '"'
  for (const ch of s) {
    if (ch < ' ' || ch > '~') out += [...Buffer.from(ch)].map((b) => `\\x${b.toString(16).padStart(2, '0')}`).join('')
    else out += ch === '"' || ch === '\\' ? `\\${ch}` : ch
  }
  return `${out}"`
}

/** time.ParseDuration, in nanoseconds; throws DecodeError with Go's message. */
function parseDuration (orig: string): bigint {
  const invalid = (): DecodeError => new DecodeError(`time: invalid duration ${goQuote(orig)}`)
  let s = orig
  const negative = s.startsWith('-')
  if (negative || s.startsWith('+')) s = s.slice(1)
  if (s === '0') return 0n
  if (s === '') throw invalid()
  let total = 0n
  while (s !== '') {
    const [all, whole, fraction = '', unit] = /^(\d*)(?:\.(\d*))?([^\d.]*)/.exec(s) as unknown as [string, string, string | undefined, string]
    s = s.slice(all.length)
    if (whole === '' && fraction === '') throw invalid()
    if (unit === '') throw new DecodeError(`time: missing unit in duration ${goQuote(orig)}`)
    const scale = DURATION_UNIT_NS[unit]
    if (scale === undefined) throw new DecodeError(`time: unknown unit ${goQuote(unit)} in duration ${goQuote(orig)}`)
    let v = BigInt(`0${whole}`)
    if (v > MAX_NS / scale) throw invalid()
    v *= scale
    // Go keeps at most the fraction digits that fit in an int64 and converts through float64.
    const digits = fraction.slice(0, 18)
    v += BigInt(Math.trunc(Number(`0${digits}`) * (Number(scale) / 10 ** digits.length)))
    total += v
    if (total > MAX_NS) throw invalid()
  }
  if (negative) return -total
  if (total === MAX_NS) throw invalid()
  return total
}

/** time.Duration.String() for a non-zero duration: `50ms`, `1.5s`, `1m0s`, `1h0m0s`. */
function formatDuration (d: bigint): string {
  const sign = d < 0n ? '-' : ''
  const u = d < 0n ? -d : d
  const frac = (v: bigint, unit: bigint): string => {
    const rest = (v % unit).toString().padStart(unit.toString().length - 1, '0').replace(/0+$/, '')
    return `${v / unit}${rest === '' ? '' : `.${rest}`}`
  }
  if (u < 1_000n) return `${sign}${u}ns`
  if (u < 1_000_000n) return `${sign}${frac(u, 1_000n)}µs`
  if (u < 1_000_000_000n) return `${sign}${frac(u, 1_000_000n)}ms`
  const seconds = `${frac(u % 60_000_000_000n, 1_000_000_000n)}s`
  const minutes = u / 60_000_000_000n
  if (minutes === 0n) return `${sign}${seconds}`
  const hours = minutes / 60n
  return `${sign}${hours === 0n ? '' : `${hours}h`}${minutes % 60n}m${seconds}`
}

// setTimeout takes at most 2^31-1 ms; longer durations would fire at once.
const toTimerMs = (ns: bigint): number => Math.min(Number(ns / 1_000_000n), 2 ** 31 - 1)

// ---------------------------------------------------------------------------------------------
// Registration model.

interface ServiceDef {
  Kind: string
  ID: string
  Service: string
  Tags: string[] | undefined
  Address: string
  TaggedAddresses: Record<string, { Address: string, Port: number }>
  Meta: Record<string, string> | undefined
  Port: number
  SocketPath: string
  Weights: { Passing: number, Warning: number }
  EnableTagOverride: boolean
  Locality: Obj | undefined
  Proxy: Obj
  Native: boolean
}

interface CheckSpec {
  CheckID: string
  Name: string
  Status: string
  Notes: string
  ScriptArgs: string[]
  HTTP: string
  Header: Record<string, string[]>
  Method: string
  Body: string
  DisableRedirects: boolean
  TCP: string
  TCPUseTLS: boolean
  UDP: string
  GRPC: string
  H2PING: string
  OSService: string
  AliasNode: string
  AliasService: string
  TLSServerName: string
  TLSSkipVerify: boolean
  Interval: bigint
  Timeout: bigint
  TTL: bigint
  DeregisterCriticalServiceAfter: bigint
  SuccessBeforePassing: number
  FailuresBeforeWarning: number
  FailuresBeforeCritical: number
  OutputMaxSize: number
}

interface ServiceState {
  def: ServiceDef
  createIndex: number
  modifyIndex: number
}

interface CheckState {
  id: string
  name: string
  notes: string
  serviceId: string
  serviceName: string
  serviceTags: string[]
  type: 'http' | 'tcp' | 'ttl'
  interval: string
  timeout: string
  status: CheckStatus
  output: string
  createIndex: number
  modifyIndex: number
  spec: CheckSpec
  /** ms a critical check may stay critical before its service is deregistered; 0 = never. */
  reapAfter: number
  /** When the check last turned critical (local.State's CriticalTime). */
  criticalSince: number | undefined
  abort: AbortController
  timer: NodeJS.Timeout | undefined
  /** Last output set through the TTL API, quoted when the TTL expires. */
  lastOutput: string
}

const STATUSES = new Set<string>(['passing', 'warning', 'critical'])
const GATEWAYS = new Set(['mesh-gateway', 'terminating-gateway', 'ingress-gateway', 'api-gateway'])
// Gateways other than ingress and API gateways need a port (NodeService.ValidateForAgent).
const GATEWAYS_WITH_PORT = new Set(['mesh-gateway', 'terminating-gateway'])
const DEFAULT_OUTPUT_MAX = 4096 // checks.DefaultBufSize

const str = (v: unknown): string => (typeof v === 'string' ? v : '')
const num = (v: unknown): number => (typeof v === 'number' ? v : 0)
const obj = (v: unknown): Obj => (isObject(v) ? v : {})
const strList = (v: unknown): string[] => (Array.isArray(v) ? v as string[] : [])
const dur = (v: unknown): bigint => (typeof v === 'bigint' ? v : 0n)
// Orders strings by UTF-16 code units, like Go's byte order for ASCII, whatever the locale.
const byText = (a: string, b: string): number => Number(a > b) - Number(a < b)

/** CheckType.Empty: every field at its zero value. */
function isEmptyCheck (c: Obj): boolean {
  return Object.values(c).every((v) => v === 0n || isEmpty(v, STRING))
}
const goQ = (s: string): string => JSON.stringify(s)

/** go-multierror's default format, which Consul prints after "Validation failed: ". */
function multiError (errors: string[]): string {
  if (errors.length === 1) return `1 error occurred:\n\t* ${errors[0] as string}\n\n`
  return `${errors.length} errors occurred:\n\t${errors.map((e) => `* ${e}`).join('\n\t')}\n\n`
}

function ipFamily (address: string): 4 | 6 | 0 {
  return net.isIPv4(address) ? 4 : net.isIPv6(address) ? 6 : 0
}

function checkSpec (c: Obj): CheckSpec {
  return {
    CheckID: str(c.CheckID),
    Name: str(c.Name),
    Status: str(c.Status),
    Notes: str(c.Notes),
    ScriptArgs: strList(c.ScriptArgs),
    HTTP: str(c.HTTP),
    Header: obj(c.Header) as Record<string, string[]>,
    Method: str(c.Method),
    Body: str(c.Body),
    DisableRedirects: c.DisableRedirects === true,
    TCP: str(c.TCP),
    TCPUseTLS: c.TCPUseTLS === true,
    UDP: str(c.UDP),
    GRPC: str(c.GRPC),
    H2PING: str(c.H2PING),
    OSService: str(c.OSService),
    AliasNode: str(c.AliasNode),
    AliasService: str(c.AliasService),
    TLSServerName: str(c.TLSServerName),
    TLSSkipVerify: c.TLSSkipVerify === true,
    Interval: dur(c.Interval),
    Timeout: dur(c.Timeout),
    TTL: dur(c.TTL),
    DeregisterCriticalServiceAfter: dur(c.DeregisterCriticalServiceAfter),
    SuccessBeforePassing: num(c.SuccessBeforePassing),
    FailuresBeforeWarning: num(c.FailuresBeforeWarning),
    FailuresBeforeCritical: num(c.FailuresBeforeCritical),
    OutputMaxSize: num(c.OutputMaxSize)
  }
}

/** CheckType.Validate, message for message. */
function validateCheck (c: CheckSpec): string | undefined {
  const intervalCheck = c.ScriptArgs.length > 0 || c.HTTP !== '' || c.TCP !== '' || c.UDP !== '' || c.GRPC !== '' || c.H2PING !== '' || c.OSService !== ''
  const alias = c.AliasNode !== '' || c.AliasService !== ''
  if (c.Interval > 0n && c.TTL > 0n) return 'Interval and TTL cannot both be specified'
  if (intervalCheck && c.Interval <= 0n) return 'Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks'
  if (intervalCheck && alias) return 'Interval cannot be set for Alias checks'
  if (alias && c.TTL > 0n) return 'TTL must be not be set for Alias checks'
  if (!intervalCheck && !alias && c.TTL <= 0n) return 'TTL must be > 0 for TTL checks'
  if (c.OutputMaxSize < 0) return 'MaxOutputMaxSize must be positive'
  if (c.FailuresBeforeWarning > c.FailuresBeforeCritical) return "FailuresBeforeWarning can't be higher than FailuresBeforeCritical"
  return undefined
}

/** validateMetadata (structs.go) for a service: the first bad pair, in the order given. */
function validateMeta (kind: string, meta: Record<string, string>): string | undefined {
  const entries = Object.entries(meta)
  if (entries.length > 64) return 'Node metadata cannot contain more than 64 key/value pairs'
  for (const [key, value] of entries) {
    let problem: string | undefined
    if (key === '') problem = 'Key cannot be blank'
    else if (!/^[a-zA-Z0-9_-]+$/.test(key)) problem = 'Key contains invalid characters'
    else if (Buffer.byteLength(key) > 128) problem = 'Key is too long (limit: 128 characters)'
    else if (key.startsWith('consul-') && !(kind === 'mesh-gateway' && key === 'consul-wan-federation')) problem = "Key prefix 'consul-' is reserved for internal use"
    else if (Buffer.byteLength(value) > 512) problem = 'Value is too long (limit: 512 characters)'
    if (problem !== undefined) return `Couldn't load metadata pair ('${key}', '${value}'): ${problem}`
  }
  return undefined
}

/**
 * NodeService.Validate, in its order and words, minus what only proxies and gateways in a real
 * mesh need: upstream, expose-path and opaque-config checks, and the gateways' Proxy.* rules.
 */
function validateService (d: ServiceDef): string[] {
  const errors: string[] = []
  if (d.Kind === 'connect-proxy') {
    const destination = str(d.Proxy.DestinationServiceName)
    if (d.Port === 0 && d.SocketPath === '') errors.push('Port or SocketPath must be set for a connect-proxy')
    if (destination.trim() === '') errors.push('Proxy.DestinationServiceName must be non-empty for Connect proxy services')
    if (destination === '*') errors.push('Proxy.DestinationServiceName must not be a wildcard for Connect proxy services')
    if (d.Native) errors.push('A Proxy cannot also be Connect Native, only typical services')
  }
  if (GATEWAYS_WITH_PORT.has(d.Kind) && d.Port === 0) errors.push(`Port must be non-zero for a ${d.Kind}`)
  if (d.Native && d.Port === 0 && d.SocketPath === '') errors.push('Port or SocketPath must be set for a Connect native service.')
  return errors
}

// ---------------------------------------------------------------------------------------------
// Rendering, in the field order and with the omitempty rules of Consul's JSON.

/** Drops what Go's omitempty drops (zero scalars, empty maps and slices), except `keep`. */
function omit (o: Obj, keep: readonly string[] = []): Obj {
  const out: Obj = {}
  for (const [key, v] of Object.entries(o)) {
    const empty = v === undefined || v === '' || v === 0 || v === false || (typeof v === 'object' && v !== null && Object.keys(v).length === 0)
    if (!empty || keep.includes(key)) out[key] = v
  }
  return out
}

/** Go marshals maps with sorted keys. */
function sortDeep (v: unknown): unknown {
  if (Array.isArray(v)) return v.map(sortDeep)
  if (!isObject(v)) return v
  return Object.fromEntries(Object.keys(v).sort().map((key) => [key, sortDeep(v[key])]))
}

function renderUpstream (u: Obj, api: boolean): Obj {
  return omit({
    DestinationType: u.DestinationType,
    DestinationNamespace: u.DestinationNamespace,
    DestinationPartition: u.DestinationPartition,
    DestinationPeer: u.DestinationPeer,
    DestinationName: str(u.DestinationName),
    Datacenter: str(u.Datacenter),
    LocalBindAddress: u.LocalBindAddress,
    LocalBindPort: u.LocalBindPort,
    LocalBindSocketPath: u.LocalBindSocketPath,
    LocalBindSocketMode: u.LocalBindSocketMode,
    Config: sortDeep(u.Config),
    MeshGateway: omit({ Mode: obj(u.MeshGateway).Mode }),
    CentrallyConfigured: u.CentrallyConfigured
  }, api ? ['MeshGateway'] : ['DestinationType', 'DestinationName', 'Datacenter', 'MeshGateway'])
}

/** structs.ConnectProxyConfig (health) or api.AgentServiceConnectProxyConfig (agent) JSON. */
function renderProxy (p: Obj, api: boolean): Obj {
  const expose = obj(p.Expose)
  return omit({
    TransparentProxy: omit(obj(p.TransparentProxy)),
    AccessLogs: omit(obj(p.AccessLogs)),
    EnvoyExtensions: sortDeep(p.EnvoyExtensions),
    DestinationServiceName: p.DestinationServiceName,
    DestinationServiceID: p.DestinationServiceID,
    LocalServiceAddress: p.LocalServiceAddress,
    LocalServicePort: p.LocalServicePort,
    LocalServiceSocketPath: p.LocalServiceSocketPath,
    Mode: str(p.Mode),
    Config: sortDeep(p.Config),
    Upstreams: (p.Upstreams as Obj[] | undefined)?.map((u) => renderUpstream(u, api)),
    MeshGateway: omit({ Mode: obj(p.MeshGateway).Mode }),
    Expose: omit({ Checks: expose.Checks, Paths: (expose.Paths as Obj[] | undefined)?.map((e) => omit(e)) })
  }, api ? ['MeshGateway', 'Expose'] : ['Mode', 'MeshGateway', 'Expose'])
}

function contentHash (body: Obj): string {
  // Consul hashes the struct with hashstructure (a uint64 printed with %x); any stable digest of
  // the same content serves clients, which only compare hashes.
  const digest = createHash('sha256').update(JSON.stringify(body)).digest()
  return digest.readBigUInt64BE(0).toString(16)
}

// ---------------------------------------------------------------------------------------------
// Probes, like agent/checks: each resolves (never rejects) with a status and Consul-style output.

type ProbeResult = [CheckStatus, string]

// Node's codes for a certificate that does not verify; Go reports them as "tls: failed to verify".
const TLS_VERIFY_CODES = new Set<string | undefined>([
  'DEPTH_ZERO_SELF_SIGNED_CERT', 'SELF_SIGNED_CERT_IN_CHAIN', 'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY', 'CERT_HAS_EXPIRED', 'ERR_TLS_CERT_ALTNAME_INVALID'
])

/** Go's wording for a failed dial or handshake, as far as Node's error tells it. */
function netError (err: NodeJS.ErrnoException, dialAddress: string): string {
  if (err.code === 'ECONNREFUSED') return `dial tcp ${dialAddress}: connect: connection refused`
  if (TLS_VERIFY_CODES.has(err.code)) return `tls: failed to verify certificate: x509: ${err.message}`
  return err.message
}

const REDIRECT_CODES = new Set([301, 302, 303, 307, 308])

function requestOnce (url: URL, method: string, c: CheckSpec, body: string, signal: AbortSignal): Promise<IncomingMessage> {
  return new Promise((resolve, reject) => {
    if (url.protocol !== 'http:' && url.protocol !== 'https:') {
      reject(new Error(`unsupported protocol scheme ${goQ(url.protocol.slice(0, -1))}`))
      return
    }
    // Go sends Header["Host"] as the request's Host: its first value only.
    const headers: Record<string, string | string[]> = Object.fromEntries(Object.entries(c.Header)
      .map(([key, values]) => [key, key.toLowerCase() === 'host' ? values[0] : values])
      .filter(([, values]) => values !== undefined))
    const has = (name: string): boolean => Object.keys(headers).some((key) => key.toLowerCase() === name)
    if (!has('user-agent')) headers['User-Agent'] = 'Consul Health Check'
    if (!has('accept')) headers.Accept = 'text/plain, text/*, */*'
    // A fresh connection per run, as Consul disables keep-alives; no client certificate is sent.
    const req = (url.protocol === 'https:' ? https : http).request(url, {
      method,
      headers,
      signal,
      agent: false,
      rejectUnauthorized: !c.TLSSkipVerify,
      servername: c.TLSServerName === '' ? undefined : c.TLSServerName
    }, resolve)
    req.on('error', reject)
    req.on('socket', (socket) => socket.unref())
    req.end(body)
  })
}

function readBody (res: IncomingMessage, max: number): Promise<string> {
  return new Promise((resolve) => {
    // Consul reads the body into a ring buffer that keeps the last `max` bytes. A failed read is
    // only logged there: the status still comes from the code, the output from what arrived.
    const finish = (): void => resolve(Buffer.concat(chunks).subarray(-max).toString())
    let chunks: Buffer[] = []
    let length = 0
    res.on('data', (chunk: Buffer) => {
      chunks.push(chunk)
      length += chunk.length
      if (length > 2 * max) {
        chunks = [Buffer.concat(chunks).subarray(-max)]
        length = max
      }
    })
    res.on('end', finish)
    res.on('error', finish)
    // An aborted response may close without an error; after 'end' this changes nothing.
    res.on('close', finish)
  })
}

/** One exchange, following redirects like Go's client: at most 10, 301-303 as a bodiless GET. */
async function follow (url: URL, method: string, c: CheckSpec, body: string, signal: AbortSignal, hops: number): Promise<IncomingMessage> {
  const res = await requestOnce(url, method, c, body, signal)
  const code = res.statusCode as number
  const location = res.headers.location
  if (c.DisableRedirects || !REDIRECT_CODES.has(code) || location === undefined) return res
  res.resume()
  if (hops === 10) throw new Error('stopped after 10 redirects')
  const downgrade = code === 303 || (code <= 302 && method !== 'GET' && method !== 'HEAD')
  return await follow(new URL(location, url), downgrade ? 'GET' : method, c, downgrade ? '' : body, signal, hops + 1)
}

async function httpProbe (c: CheckSpec, timeoutMs: number, maxOutput: number, stop: AbortSignal): Promise<ProbeResult> {
  const method = c.Method === '' ? 'GET' : c.Method
  let url: URL
  try {
    url = new URL(c.HTTP)
  } catch {
    return ['critical', `parse ${goQ(c.HTTP)}: invalid URL`]
  }
  const deadline = AbortSignal.timeout(timeoutMs)
  const signal = AbortSignal.any([stop, deadline])
  try {
    const res = await follow(url, method, c, c.Body, signal, 0)
    const code = res.statusCode as number
    const output = await readBody(res, maxOutput)
    // The output names the check's own method and URL, whatever redirects happened.
    const result = `HTTP ${method} ${c.HTTP}: ${code} ${res.statusMessage as string} Output: ${output}`
    if (code >= 200 && code <= 299) return ['passing', result]
    return [code === 429 ? 'warning' : 'critical', result]
  } catch (err) {
    const op = method[0] + method.slice(1).toLowerCase()
    const reason = deadline.aborted
      ? 'context deadline exceeded (Client.Timeout exceeded while awaiting headers)'
      : netError(err as NodeJS.ErrnoException, `${url.hostname}:${url.port === '' ? (url.protocol === 'https:' ? '443' : '80') : url.port}`)
    return ['critical', `${op} ${goQ(c.HTTP)}: ${reason}`]
  }
}

function tcpProbe (c: CheckSpec, timeoutMs: number, stop: AbortSignal): Promise<ProbeResult> {
  const address = c.TCP
  const m = /^(?:\[([^\]]*)\]|([^:[\]]*)):(\d+)$/.exec(address)
  if (m === null) return Promise.resolve(['critical', `dial tcp: address ${address}: missing port in address`])
  const port = Number(m[3])
  if (port > 65535) return Promise.resolve(['critical', `dial tcp: address ${address}: invalid port`])
  const host = m[1] ?? m[2] as string
  return new Promise((resolve) => {
    const socket = c.TCPUseTLS
      ? tls.connect({ host, port, rejectUnauthorized: !c.TLSSkipVerify, servername: c.TLSServerName === '' ? undefined : c.TLSServerName })
      : net.connect({ host, port })
    const done = (result: ProbeResult): void => {
      clearTimeout(timer)
      stop.removeEventListener('abort', onStop)
      socket.destroy()
      resolve(result)
    }
    const onStop = (): void => done(['critical', 'stopped'])
    const timer = setTimeout(() => done(['critical', `dial tcp ${address}: i/o timeout`]), timeoutMs)
    timer.unref()
    socket.unref()
    stop.addEventListener('abort', onStop)
    socket.once(c.TCPUseTLS ? 'secureConnect' : 'connect', () => done(['passing', `${c.TCPUseTLS ? 'TCP+TLS' : 'TCP'} connect ${address}: Success`]))
    socket.once('error', (err) => done(['critical', netError(err, address)]))
  })
}

/**
 * checks.StatusHandler: SuccessBeforePassing / FailuresBeforeWarning / FailuresBeforeCritical.
 * Counters start at their thresholds so the first result applies at once.
 */
function statusHandler (c: CheckSpec): (status: CheckStatus) => CheckStatus | undefined {
  const beforeWarning = c.FailuresBeforeWarning === 0 ? c.FailuresBeforeCritical : c.FailuresBeforeWarning
  let successes = c.SuccessBeforePassing
  let failures = c.FailuresBeforeCritical
  return (status) => {
    if (status !== 'critical') {
      successes++
      failures = 0
      return successes >= c.SuccessBeforePassing ? status : undefined
    }
    failures++
    successes = 0
    if (failures >= c.FailuresBeforeCritical) return 'critical'
    return failures >= beforeWarning ? 'warning' : undefined
  }
}

// ---------------------------------------------------------------------------------------------

export class DevCatalog {
  readonly #opts: DevCatalogOptions
  readonly #nodeId: string
  readonly #nodeIndex: number
  readonly #timing: Required<DevCatalogTiming>
  readonly #services = new Map<string, ServiceState>()
  readonly #checks = new Map<string, CheckState>()
  readonly #reaper: NodeJS.Timeout
  #healthIndex: number
  #closed = false

  constructor (opts: DevCatalogOptions) {
    this.#opts = opts
    this.#nodeId = opts.nodeId ?? randomUUID()
    this.#timing = {
      minCheckInterval: opts.timing?.minCheckInterval ?? 1000,
      maxFirstRunDelay: opts.timing?.maxFirstRunDelay ?? 250,
      minDeregisterCriticalAfter: opts.timing?.minDeregisterCriticalAfter ?? 60_000,
      reapInterval: opts.timing?.reapInterval ?? 30_000
    }
    // The node and its serfHealth check are registered once, when the agent starts.
    this.#nodeIndex = opts.nextIndex()
    this.#healthIndex = this.#nodeIndex
    this.#reaper = setInterval(() => this.#reap(), this.#timing.reapInterval)
    this.#reaper.unref()
  }

  /**
   * PUT /v1/agent/service/register. `body` is the parsed JSON (undefined for an empty body).
   * Throws DevAgentHttpError with Consul's status and message.
   */
  register (body: unknown, replaceExistingChecks: boolean): void {
    const { def, specs } = this.#validate(body)
    this.#apply(def, specs, replaceExistingChecks)
  }

  /** PUT /v1/agent/service/deregister/:id; stops the service's checks. */
  deregister (id: string): void {
    // Consul 1.10 answered 200 for an unknown ID; current Consul answers 404 (vetServiceUpdateWithAuthorizer).
    if (!this.#services.has(id)) {
      throw new DevAgentHttpError(404, `Unknown service ID ${goQ(id)}. Ensure that the service ID is passed, not the service name.`)
    }
    this.#removeService(id)
  }

  /** GET /v1/agent/service/:id: api.AgentService with ContentHash, and that hash; null if unknown. */
  service (id: string): { body: object, hash: string } | null {
    const state = this.#services.get(id)
    if (state === undefined) return null
    const hash = contentHash(this.#agentService(state, ''))
    return { body: this.#agentService(state, hash), hash }
  }

  /** GET /v1/agent/services: api.AgentService by ID, without ContentHash. */
  services (): Record<string, object> {
    return Object.fromEntries([...this.#services.keys()].sort().map((id) => [id, this.#agentService(this.#services.get(id) as ServiceState, '')]))
  }

  /**
   * GET /v1/health/connect/:name: Connect-native instances named `name` and connect-proxy
   * instances whose Proxy.DestinationServiceName is `name` (names compare case-insensitively, as
   * Consul's catalog indexes do). `passingOnly` keeps instances whose checks, the node's
   * serfHealth included, all pass (health_endpoint.go, filterNonPassing).
   */
  healthConnect (name: string, passingOnly: boolean): object[] {
    const wanted = name.toLowerCase()
    return this.#health(passingOnly, (d) => (d.Kind === 'connect-proxy' ? str(d.Proxy.DestinationServiceName) : d.Native ? d.Service : undefined)?.toLowerCase() === wanted)
  }

  /**
   * GET /v1/health/service/:name: every instance named `name`. `consul`, the service every
   * Consul server runs, is the agent's own node (the dev agent is its datacenter's one server).
   */
  healthService (name: string, passingOnly: boolean): object[] {
    const wanted = name.toLowerCase()
    const found = this.#health(passingOnly, (d) => d.Service.toLowerCase() === wanted)
    if (wanted !== 'consul') return found
    const server = {
      ID: 'consul',
      Service: 'consul',
      Tags: [],
      Address: '',
      Meta: { raft_version: '3', serf_protocol_current: '2', serf_protocol_max: '5', serf_protocol_min: '1', version: CONSUL_VERSION },
      Port: 8300,
      Weights: { Passing: 1, Warning: 1 },
      EnableTagOverride: false,
      Proxy: renderProxy({}, false),
      Connect: {},
      CreateIndex: this.#nodeIndex,
      ModifyIndex: this.#nodeIndex
    }
    return [{ Node: this.#node(), Service: server, Checks: [this.#serfHealth()] }, ...found]
  }

  #health (passingOnly: boolean, selected: (d: ServiceDef) => boolean): object[] {
    const out: object[] = []
    const states = [...this.#services.values()].sort((a, b) => byText(a.def.ID.toLowerCase(), b.def.ID.toLowerCase()))
    for (const state of states) {
      const d = state.def
      if (!selected(d)) continue
      const checks = [this.#serfHealth(), ...[...this.#checks.values()].filter((c) => c.serviceId === d.ID).map((c) => this.#renderCheck(c))]
      checks.sort((a, b) => byText(str(a.CheckID).toLowerCase(), str(b.CheckID).toLowerCase()))
      if (passingOnly && checks.some((c) => c.Status !== 'passing')) continue
      out.push({ Node: this.#node(), Service: this.#nodeService(state), Checks: checks })
    }
    return out
  }

  /** Index of the last change that affects health answers (registrations and check statuses). */
  healthIndex (): number {
    return this.#healthIndex
  }

  /** TTL update (PUT /v1/agent/check/pass|warn|fail/:id, /update/:id). */
  updateCheck (checkId: string, status: CheckStatus, output = ''): void {
    if (!STATUSES.has(status)) throw new DevAgentHttpError(400, `Invalid check status: '${status as string}'`)
    const check = this.#checks.get(checkId)
    if (check === undefined) {
      throw new DevAgentHttpError(404, `Unknown check ID ${goQ(checkId)}. Ensure that the check ID is passed, not the check name.`)
    }
    if (check.type !== 'ttl') throw new DevAgentHttpError(500, `CheckID ${goQ(checkId)} does not have associated TTL`)
    const max = this.#outputMax(check.spec)
    const bytes = Buffer.from(output)
    const text = bytes.length > max ? `${bytes.subarray(0, max).toString()} ... (captured ${max} of ${bytes.length} bytes)` : output
    this.#setStatus(check, status, text)
    check.lastOutput = text
    this.#armTtl(check)
  }

  /** Stops every check and timer; nothing of the catalog keeps the event loop alive afterwards. */
  close (): void {
    this.#closed = true
    clearInterval(this.#reaper)
    for (const check of this.#checks.values()) stopCheck(check)
  }

  // --- registration ---------------------------------------------------------------------------

  #validate (body: unknown): { def: ServiceDef, specs: CheckSpec[] } {
    let raw: Obj
    try {
      // An empty body is io.EOF to Go's decoder; a JSON null decodes to an empty definition.
      if (body === undefined) throw new DecodeError('EOF')
      raw = body === null ? {} : decodeStruct(SERVICE_DEFINITION, body, '', { strict: true }) as Obj
    } catch (err) {
      throw new DevAgentHttpError(400, `Request decode failed: ${(err as DecodeError).message}`)
    }
    const name = str(raw.Name)
    if (name === '') throw new DevAgentHttpError(400, 'Missing service name')
    const address = str(raw.Address)
    if (address === '0.0.0.0' || address === '::' || address === '[::]') throw new DevAgentHttpError(400, 'Invalid service address')

    const connect = obj(raw.Connect)
    const weights = raw.Weights as Obj | undefined
    const def: ServiceDef = {
      Kind: str(raw.Kind),
      ID: str(raw.ID) === '' ? name : str(raw.ID),
      Service: name,
      Tags: raw.Tags as string[] | undefined,
      Address: address,
      TaggedAddresses: Object.fromEntries(Object.entries(obj(raw.TaggedAddresses)).map(([key, a]) => [key, { Address: str(obj(a).Address), Port: num(obj(a).Port) }])),
      Meta: raw.Meta as Record<string, string> | undefined,
      Port: num(raw.Port),
      SocketPath: str(raw.SocketPath),
      Weights: weights === undefined ? { Passing: 1, Warning: 1 } : { Passing: num(weights.Passing), Warning: num(weights.Warning) },
      EnableTagOverride: raw.EnableTagOverride === true,
      Locality: raw.Locality as Obj | undefined,
      Proxy: { ...obj(raw.Proxy), Upstreams: (obj(raw.Proxy).Upstreams as Obj[] | undefined)?.map((u) => ({ ...u, DestinationType: str(u.DestinationType) === '' ? 'service' : u.DestinationType })) },
      Native: connect.Native === true
    }
    if (weights !== undefined) {
      // structs.ValidateWeights
      const problem = def.Weights.Passing < 1
        ? 'Passing must be greater than 0'
        : def.Weights.Warning < 0
          ? 'Warning must be greater or equal than 0'
          : def.Weights.Passing > 65535 || def.Weights.Warning > 65535 ? 'DNS Weight must be between 0 and 65535' : undefined
      if (problem !== undefined) throw new DevAgentHttpError(400, `Invalid Weights: ${problem}`)
    }
    const metaProblem = validateMeta(def.Kind, def.Meta ?? {})
    if (metaProblem !== undefined) throw new DevAgentHttpError(400, `Invalid Service Meta: ${metaProblem}`)
    const errors = validateService(def)
    if (errors.length > 0) throw new DevAgentHttpError(400, `Validation failed: ${multiError(errors)}`)

    // ServiceDefinition.CheckTypes: `Check` counts unless all its fields are empty.
    const rawChecks = [...(isEmptyCheck(obj(raw.Check)) ? [] : [obj(raw.Check)]), ...(raw.Checks as Obj[] | undefined ?? [])]
    const specs = rawChecks.map(checkSpec)
    for (const spec of specs) {
      const problem = validateCheck(spec)
      if (problem !== undefined) throw new DevAgentHttpError(400, `Invalid check: ${problem}`)
    }
    if (specs.some((spec) => spec.Status !== '' && !STATUSES.has(spec.Status))) {
      throw new DevAgentHttpError(400, "Status for checks must 'passing', 'warning', 'critical'")
    }
    if (connect.SidecarService !== undefined) {
      // Departure: Consul would also register a sidecar proxy; the dev agent runs no proxies.
      throw new DevAgentHttpError(400, 'Invalid SidecarService: the dev agent runs no sidecar proxies; register the service as Connect native')
    }
    // Agent.validateService. Consul checks lan_ipv6 twice and never wan_ipv6; so does this.
    for (const [key, family, label] of [['lan_ipv4', 4, 'ipv4'], ['wan_ipv4', 4, 'ipv4'], ['lan_ipv6', 6, 'ipv6']] as const) {
      const tagged = def.TaggedAddresses[key]
      if (tagged !== undefined && ipFamily(tagged.Address) !== family) {
        throw new DevAgentHttpError(500, `Service tagged address ${goQ(key)} must be a valid ${label} address`)
      }
    }
    for (const spec of specs) {
      if (spec.ScriptArgs.length > 0) {
        throw new DevAgentHttpError(500, "Scripts are disabled on this agent from remote calls; to enable, configure 'enable_script_checks' to true")
      }
      if (spec.GRPC !== '' || (spec.HTTP === '' && spec.TTL === 0n && spec.TCP === '')) {
        // Departure: Consul also runs gRPC, UDP, H2PING, alias and OS-service checks. A check the
        // dev agent cannot run would stay critical forever, so it is refused up front.
        throw new DevAgentHttpError(400, 'Invalid check: the dev agent runs only HTTP, TCP and TTL checks')
      }
    }
    // Agent.addServiceInternal adds the address's own tagged addresses unless given.
    const family = ipFamily(address)
    if (family !== 0) {
      def.TaggedAddresses[`lan_ipv${family}`] ??= { Address: address, Port: def.Port }
      def.TaggedAddresses[`wan_ipv${family}`] ??= { Address: address, Port: def.Port }
    }
    def.TaggedAddresses = sortDeep(def.TaggedAddresses) as ServiceDef['TaggedAddresses']
    return { def, specs }
  }

  #apply (def: ServiceDef, specs: CheckSpec[], replaceExistingChecks: boolean): void {
    let index: number | undefined
    const next = (): number => (index ??= this.#opts.nextIndex())
    const previous = this.#services.get(def.ID)
    // Re-registering an identical definition writes nothing, as anti-entropy finds it in sync.
    const serviceChanged = previous === undefined || JSON.stringify(previous.def) !== JSON.stringify(def)
    if (serviceChanged) this.#services.set(def.ID, { def, createIndex: previous?.createIndex ?? next(), modifyIndex: next() })
    let healthChanged = serviceChanged

    const fresh: CheckState[] = []
    specs.forEach((spec, i) => {
      const id = spec.CheckID !== '' ? spec.CheckID : `service:${def.ID}${specs.length > 1 ? `:${i + 1}` : ''}`
      const prior = this.#checks.get(id)
      const check: CheckState = {
        id,
        name: spec.Name === '' ? `Service '${def.Service}' check` : spec.Name,
        notes: spec.Notes,
        serviceId: def.ID,
        serviceName: def.Service,
        serviceTags: def.Tags ?? [],
        type: spec.HTTP !== '' ? 'http' : spec.TTL > 0n ? 'ttl' : 'tcp',
        interval: spec.Interval === 0n ? '' : formatDuration(spec.Interval),
        timeout: spec.Timeout === 0n ? '' : formatDuration(spec.Timeout),
        // A re-registered check keeps its status and output (Agent.addServiceInternal's snapshot).
        status: prior?.status ?? (spec.Status === '' ? 'critical' : spec.Status as CheckStatus),
        output: prior?.output ?? '',
        createIndex: 0,
        modifyIndex: 0,
        spec,
        reapAfter: spec.DeregisterCriticalServiceAfter > 0n ? Math.max(toTimerMs(spec.DeregisterCriticalServiceAfter), this.#timing.minDeregisterCriticalAfter) : 0,
        criticalSince: undefined,
        abort: new AbortController(),
        timer: undefined,
        lastOutput: ''
      }
      if (prior !== undefined) stopCheck(prior)
      if (prior !== undefined && JSON.stringify(this.#renderCheck(prior, false)) === JSON.stringify(this.#renderCheck(check, false))) {
        check.createIndex = prior.createIndex
        check.modifyIndex = prior.modifyIndex
      } else {
        check.createIndex = prior?.createIndex ?? next()
        check.modifyIndex = next()
        healthChanged = true
      }
      this.#checks.set(id, check)
      fresh.push(check)
    })
    if (replaceExistingChecks) {
      for (const [id, check] of this.#checks) {
        if (check.serviceId === def.ID && !fresh.includes(check)) {
          stopCheck(check)
          this.#checks.delete(id)
          healthChanged = true
        }
      }
    }
    // A check ID given twice ends with the last definition, as in Consul.
    for (const check of fresh) if (this.#checks.get(check.id) === check) this.#start(check)
    if (!healthChanged) return
    this.#healthIndex = next()
    if (serviceChanged) this.#opts.onChange('services')
    this.#opts.onChange('health')
  }

  #removeService (id: string): void {
    this.#services.delete(id)
    for (const [checkId, check] of this.#checks) {
      if (check.serviceId === id) {
        stopCheck(check)
        this.#checks.delete(checkId)
      }
    }
    this.#healthIndex = this.#opts.nextIndex()
    this.#opts.onChange('services')
    this.#opts.onChange('health')
  }

  // --- checks ---------------------------------------------------------------------------------

  #outputMax (c: CheckSpec): number {
    return c.OutputMaxSize > 0 && c.OutputMaxSize < DEFAULT_OUTPUT_MAX ? c.OutputMaxSize : DEFAULT_OUTPUT_MAX
  }

  #start (check: CheckState): void {
    if (this.#closed) return
    if (check.type === 'ttl') {
      this.#armTtl(check)
      return
    }
    const c = check.spec
    // Consul raises intervals below checks.MinInterval to it (with a warning).
    const interval = Math.max(toTimerMs(c.Interval), this.#timing.minCheckInterval)
    const timeoutMs = c.Timeout > 0n ? toTimerMs(c.Timeout) : 10_000
    const maxOutput = this.#outputMax(c)
    const handle = statusHandler(c)
    const signal = check.abort.signal
    const run = (): void => {
      const probe = check.type === 'http' ? httpProbe(c, timeoutMs, maxOutput, signal) : tcpProbe(c, timeoutMs, signal)
      probe.then(([status, output]) => {
        if (signal.aborted) return
        const next = handle(status)
        if (next !== undefined) this.#setStatus(check, next, output)
        check.timer = setTimeout(run, interval).unref()
      })
    }
    check.timer = setTimeout(run, Math.random() * Math.min(interval, this.#timing.maxFirstRunDelay)).unref()
  }

  /** (Re)starts a TTL check's timer: the check turns critical when nobody updates it in time. */
  #armTtl (check: CheckState): void {
    clearTimeout(check.timer)
    if (this.#closed) return
    check.timer = setTimeout(() => {
      const output = check.lastOutput === '' ? 'TTL expired' : `TTL expired (last output before timeout follows): ${check.lastOutput}`
      this.#setStatus(check, 'critical', output)
    }, toTimerMs(check.spec.TTL)).unref()
  }

  /** local.State.UpdateCheck followed by the catalog write anti-entropy makes for it. */
  #setStatus (check: CheckState, status: CheckStatus, output: string): void {
    if (status === 'critical') check.criticalSince ??= Date.now()
    else check.criticalSince = undefined
    if (check.status === status) {
      // Consul defers output-only changes to the catalog by up to check_update_interval (5 min),
      // so they wake no blocking query; the new output is simply visible on the next read.
      check.output = output
      return
    }
    const index = this.#opts.nextIndex()
    check.status = status
    check.output = output
    check.modifyIndex = index
    this.#healthIndex = index
    this.#opts.onChange('health')
  }

  #reap (): void {
    const now = Date.now()
    for (const check of this.#checks.values()) {
      if (check.reapAfter > 0 && check.criticalSince !== undefined && now - check.criticalSince > check.reapAfter) {
        this.#removeService(check.serviceId)
      }
    }
  }

  // --- rendering ------------------------------------------------------------------------------

  #node (): Obj {
    const address = this.#opts.nodeAddress
    const v = ipFamily(address) === 6 ? 'ipv6' : 'ipv4'
    return {
      ID: this.#nodeId,
      Node: this.#opts.nodeName,
      Address: address,
      Datacenter: this.#opts.datacenter,
      TaggedAddresses: { lan: address, [`lan_${v}`]: address, wan: address, [`wan_${v}`]: address },
      Meta: { 'consul-network-segment': '' },
      CreateIndex: this.#nodeIndex,
      ModifyIndex: this.#nodeIndex
    }
  }

  #serfHealth (): Obj {
    return {
      Node: this.#opts.nodeName,
      CheckID: 'serfHealth',
      Name: 'Serf Health Status',
      Status: 'passing',
      Notes: '',
      Output: 'Agent alive and reachable',
      ServiceID: '',
      ServiceName: '',
      ServiceTags: [],
      Type: '',
      Interval: '',
      Timeout: '',
      ExposedPort: 0,
      Definition: {},
      CreateIndex: this.#nodeIndex,
      ModifyIndex: this.#nodeIndex
    }
  }

  /** structs.HealthCheck JSON; Definition stays empty for checks registered with a service. */
  #renderCheck (c: CheckState, withIndexes = true): Obj {
    return {
      Node: this.#opts.nodeName,
      CheckID: c.id,
      Name: c.name,
      Status: c.status,
      Notes: c.notes,
      Output: c.output,
      ServiceID: c.serviceId,
      ServiceName: c.serviceName,
      ServiceTags: [...c.serviceTags],
      Type: c.type,
      Interval: c.interval,
      Timeout: c.timeout,
      ExposedPort: 0,
      Definition: {},
      ...(withIndexes ? { CreateIndex: c.createIndex, ModifyIndex: c.modifyIndex } : {})
    }
  }

  /** structs.NodeService JSON as the health endpoints return it. */
  #nodeService (state: ServiceState): Obj {
    const d = state.def
    return {
      ...omit({ Kind: d.Kind }),
      ID: d.ID,
      Service: d.Service,
      Tags: [...(d.Tags ?? [])],
      Address: d.Address,
      ...omit({ TaggedAddresses: d.TaggedAddresses }),
      Meta: d.Meta === undefined ? null : sortDeep(d.Meta),
      ...omit({ Port: d.Port, SocketPath: d.SocketPath }),
      Weights: { ...d.Weights },
      EnableTagOverride: d.EnableTagOverride,
      ...omit({ Locality: omit(obj(d.Locality)) }),
      Proxy: renderProxy(d.Proxy, false),
      Connect: d.Native ? { Native: true } : {},
      CreateIndex: state.createIndex,
      ModifyIndex: state.modifyIndex
    }
  }

  /** api.AgentService JSON (agent_endpoint.go, buildAgentService). */
  #agentService (state: ServiceState, hash: string): Obj {
    const d = state.def
    return {
      ...omit({ Kind: d.Kind }),
      ID: d.ID,
      Service: d.Service,
      Tags: [...(d.Tags ?? [])],
      Meta: sortDeep(d.Meta ?? {}),
      Port: d.Port,
      Address: d.Address,
      ...omit({ SocketPath: d.SocketPath, TaggedAddresses: d.TaggedAddresses }),
      // buildAgentService turns Passing 0 into 1; validation already refused it.
      Weights: { ...d.Weights },
      EnableTagOverride: d.EnableTagOverride,
      ...omit({
        ContentHash: hash,
        Proxy: d.Kind === 'connect-proxy' || GATEWAYS.has(d.Kind) ? renderProxy(d.Proxy, true) : undefined,
        Connect: d.Native ? { Native: true } : undefined
      }),
      Datacenter: this.#opts.datacenter,
      ...omit({ Locality: omit(obj(d.Locality)) })
    }
  }
}

function stopCheck (check: CheckState): void {
  check.abort.abort()
  clearTimeout(check.timer)
}
