// A slow, obviously-correct transcription of docs/semantics.md#first-match (with the rest of docs/semantics.md#decision-rules) used as the
// oracle of the property tests. It re-sorts, scans and recompiles regexes on every call, and
// shares no code with lib/intentions: if both agree, the fast engine implements the rule.
import { RE2JS } from 're2js'
import type { Intention, IntentionHTTPHeaderPermission, IntentionHTTPPermission, IntentionJWTRequirement, IntentionPermission } from '../../lib/agent/wire'
import type { CallerIdentity, PolicyInput, RequestFacts, RouteSource } from '../../lib/intentions/policy'

export interface RefDecision { allow: boolean, reason: string }

const HTTP_LIKE = ['http', 'http2', 'grpc']

/** Byte-wise order of the UTF-8 encodings, exactly what Go's string comparison does. */
function byteOrder (a: string, b: string): number {
  return Buffer.compare(Buffer.from(a, 'utf8'), Buffer.from(b, 'utf8'))
}

function def (s: string | undefined | null): string {
  return s === undefined || s === null || s === '' ? 'default' : s
}

function name (partition: string | undefined, ns: string | undefined, n: string): string {
  return (def(partition) === 'default' ? '' : def(partition) + '/') + def(ns) + '/' + n
}

function wantsJwt (jwt: IntentionJWTRequirement | undefined): boolean {
  return (jwt?.Providers ?? []).length > 0
}

/** docs/semantics.md#jwt-match and #jwt-claims: some provider verified a token whose claims all match. */
function jwtHolds (jwt: IntentionJWTRequirement | undefined, req: RequestFacts): boolean {
  if (!wantsJwt(jwt)) return true
  return (jwt?.Providers ?? []).some((p) => {
    const payload = req.jwt?.payload(p.Name) ?? null
    if (payload === null) return false
    return (p.VerifyClaims ?? []).every((c) => {
      const path = c.Path ?? []
      if (path.length === 0) return false
      let node: unknown = payload
      for (const key of path) {
        if (node === null || typeof node !== 'object' || Array.isArray(node) || !Object.hasOwn(node, key)) return false
        node = (node as Record<string, unknown>)[key]
      }
      return node === (c.Value ?? '') || (Array.isArray(node) && node.includes(c.Value ?? ''))
    })
  })
}

/** Node strings carry one byte per char; Envoy compares UTF-8 bytes. */
function asBytes (s: string): string {
  return Buffer.from(s, 'utf8').toString('latin1')
}

function asText (v: string): string {
  const wide = [...v].some((ch) => ch.charCodeAt(0) > 0xff)
  const high = [...v].some((ch) => ch.charCodeAt(0) >= 0x80)
  return high && !wide ? Buffer.from(v, 'latin1').toString('utf8') : v
}

function lowerAscii (s: string): string {
  return s.replace(/[A-Z]/g, (c) => c.toLowerCase())
}

// docs/semantics.md#transport-headers: the names Node keeps single-valued, per transport.
const SINGLE_HTTP1 = new Set(['age', 'authorization', 'content-length', 'content-type', 'etag', 'expires', 'from', 'host',
  'if-modified-since', 'if-unmodified-since', 'last-modified', 'location', 'max-forwards', 'proxy-authorization', 'referer',
  'retry-after', 'server', 'user-agent'])
const SINGLE_HTTP2 = new Set([...SINGLE_HTTP1, 'access-control-allow-credentials', 'access-control-max-age',
  'access-control-request-method', 'content-encoding', 'content-language', 'content-location', 'content-md5', 'content-range',
  'date', 'dnt', 'if-match', 'if-none-match', 'if-range', 'range', 'tk', 'upgrade-insecure-requests', 'x-content-type-options'])
SINGLE_HTTP2.delete('server')

function lookupHeader (req: RequestFacts, headerName: string): string | undefined {
  const wanted = headerName.toLowerCase()
  if (wanted === ':method') return req.method
  if (wanted === ':path') return req.url
  const collect = (n: string): string[] => {
    const values: string[] = []
    for (let i = 0; i < req.rawHeaders.length; i += 2) {
      if (req.rawHeaders[i].toLowerCase() === n) values.push(req.rawHeaders[i + 1])
    }
    return values
  }
  // Host and :authority: what the application reads, host first; each its first value.
  if (wanted === 'host' || wanted === ':authority') return collect('host')[0] ?? collect(':authority')[0]
  const values = collect(wanted)
  if (values.length === 0) return undefined
  const http2 = req.rawHeaders.length > 0 && req.rawHeaders[0].startsWith(':')
  if ((http2 ? SINGLE_HTTP2 : SINGLE_HTTP1).has(wanted)) return values[0]
  return values.join(wanted === 'cookie' ? '; ' : ',')
}

function headerMatches (h: IntentionHTTPHeaderPermission, req: RequestFacts): boolean {
  const value = lookupHeader(req, h.Name)
  if (h.Present === true) return (value !== undefined) !== (h.Invert === true)
  if (value === undefined) return false
  let ok: boolean
  const fold = (s: string): string => (h.IgnoreCase === true ? lowerAscii(s) : s)
  if (h.Exact !== undefined && h.Exact !== '') ok = fold(value) === fold(asBytes(h.Exact))
  else if (h.Prefix !== undefined && h.Prefix !== '') ok = fold(value).startsWith(fold(asBytes(h.Prefix)))
  else if (h.Suffix !== undefined && h.Suffix !== '') ok = fold(value).endsWith(fold(asBytes(h.Suffix)))
  else if (h.Contains !== undefined && h.Contains !== '') ok = fold(value).includes(fold(asBytes(h.Contains)))
  else ok = RE2JS.compile(h.Regex as string).matches(asText(value))
  return ok !== (h.Invert === true)
}

function httpMatches (http: IntentionHTTPPermission | undefined, req: RequestFacts, path: string): boolean {
  if (http === undefined) return true
  if (http.Methods !== undefined && http.Methods.length > 0 && !http.Methods.includes(req.method)) return false
  if (http.PathExact !== undefined && http.PathExact !== '' && path !== asBytes(http.PathExact)) return false
  if (http.PathPrefix !== undefined && http.PathPrefix !== '' && !path.startsWith(asBytes(http.PathPrefix))) return false
  if (http.PathRegex !== undefined && http.PathRegex !== '' && !RE2JS.compile(http.PathRegex).matches(asText(path))) return false
  return (http.Header ?? []).every((h) => headerMatches(h, req))
}

/** A source rule in the reference's own terms. */
interface RefRule {
  partition: string
  ns: string
  name: string
  head: string
  action?: 'allow' | 'deny'
  permissions?: IntentionPermission[]
  jwt: IntentionJWTRequirement | undefined
}

/** The first permission (1-based number) whose HTTP conditions hold for `path`; its JWT is checked apart. */
function firstPermission (rule: RefRule, req: RequestFacts, path: string): number {
  const perms = rule.permissions as IntentionPermission[]
  for (let i = 0; i < perms.length; i++) {
    if (httpMatches(perms[i].HTTP, req, path)) return i + 1
  }
  return 0
}

function jwtFailed (head: string, defaultAllow: boolean | null): RefDecision {
  if (defaultAllow === null) return { allow: false, reason: `${head}: JWT requirement not met (deny)` }
  return { allow: defaultAllow, reason: `${head}: JWT requirement not met, default policy (${defaultAllow ? 'allow' : 'deny'})` }
}

function verdict (rule: RefRule, req: RequestFacts, http: boolean, protocol: string, defaultAllow: boolean | null): RefDecision {
  if (rule.permissions === undefined || rule.permissions.length === 0) {
    if (!http && wantsJwt(rule.jwt)) return { allow: false, reason: `${rule.head} requires a JWT but protocol ${JSON.stringify(protocol)} is not HTTP-like (deny)` }
    if (!jwtHolds(rule.jwt, req)) return jwtFailed(rule.head, defaultAllow)
    return { allow: rule.action === 'allow', reason: `${rule.head} ${rule.action as string}` }
  }
  if (!http) return { allow: false, reason: `${rule.head} has L7 permissions but protocol ${JSON.stringify(protocol)} is not HTTP-like (deny)` }
  if (!jwtHolds(rule.jwt, req)) return jwtFailed(rule.head, defaultAllow)
  const n = firstPermission(rule, req, req.path)
  if (n > 0) {
    const perm = rule.permissions[n - 1]
    if (!jwtHolds(perm.JWT, req)) return jwtFailed(`${rule.head}, permission ${n}`, defaultAllow)
    return { allow: perm.Action === 'allow', reason: `${rule.head}, permission ${n} (${perm.Action})` }
  }
  if (defaultAllow === null) return { allow: false, reason: `${rule.head}: no permission matched (deny)` }
  return { allow: defaultAllow, reason: `${rule.head}: no permission matched, default policy (${defaultAllow ? 'allow' : 'deny'})` }
}

function sourceMatches (rule: RefRule, caller: CallerIdentity): boolean {
  return rule.partition === def(caller.partition) &&
    (rule.ns === '*' || rule.ns === def(caller.namespace)) &&
    (rule.name === '*' || rule.name === caller.service)
}

function intentionRules (input: PolicyInput): RefRule[] {
  const [destName, destNs, destPartition] = input.destination.split('/').reverse()
  const usable = input.intentions.filter((i) =>
    (i.SourcePeer ?? '') === '' && (i.SourceSamenessGroup ?? '') === '' &&
    (i.DestinationName === '*' || i.DestinationName === destName) &&
    (destNs === undefined || i.DestinationNS === '*' || def(i.DestinationNS) === destNs) &&
    (destPartition === undefined || def(i.DestinationPartition) === destPartition))
  const keys: Array<keyof Intention> = ['SourceSamenessGroup', 'SourcePeer', 'SourcePartition', 'SourceNS', 'SourceName',
    'DestinationPartition', 'DestinationNS', 'DestinationName']
  const sorted = [...usable].sort((a, b) => {
    if (a.Precedence !== b.Precedence) return b.Precedence - a.Precedence
    for (const k of keys) {
      const c = byteOrder(String(a[k] ?? ''), String(b[k] ?? ''))
      if (c !== 0) return c
    }
    return 0
  })
  return sorted.map((i) => ({
    partition: def(i.SourcePartition),
    ns: def(i.SourceNS),
    name: i.SourceName,
    head: `intention ${name(i.SourcePartition, i.SourceNS, i.SourceName)} => ` +
      `${name(i.DestinationPartition, i.DestinationNS, i.DestinationName)} (precedence ${i.Precedence})`,
    action: i.Action,
    permissions: i.Permissions,
    jwt: i.JWT
  }))
}

function overrideRules (sources: readonly RouteSource[]): RefRule[] {
  const rules = sources.map((s, i) => ({
    partition: def(s.partition),
    ns: def(s.namespace),
    name: s.name,
    head: `route override sources[${i}] ` +
      (s.partition === undefined && s.namespace === undefined ? s.name : name(s.partition, s.namespace, s.name)),
    action: s.action,
    permissions: s.permissions?.map((p) => ({ ...p, HTTP: { ...p.HTTP, Methods: p.HTTP?.Methods?.map((m) => m.toUpperCase()) } })),
    jwt: s.jwt,
    precedence: def(s.namespace) === '*' ? 7 : s.name === '*' ? 8 : 9
  }))
  return rules.sort((a, b) => b.precedence - a.precedence || byteOrder(a.partition, b.partition) ||
    byteOrder(a.ns, b.ns) || byteOrder(a.name, b.name))
}

/** docs/semantics.md#first-match: the first intention (after sorting) whose source matches the caller decides. */
export function referenceDecide (input: PolicyInput, caller: CallerIdentity, req: RequestFacts): RefDecision {
  const rule = intentionRules(input).find((r) => sourceMatches(r, caller))
  if (rule === undefined) return { allow: input.defaultAllow, reason: `default policy (${input.defaultAllow ? 'allow' : 'deny'})` }
  return verdict(rule, req, HTTP_LIKE.includes(input.protocol.toLowerCase()), input.protocol, input.defaultAllow)
}

/** Route override first (null default: no policy given), falling back to nothing (null). */
export function referenceOverride (sources: readonly RouteSource[], caller: CallerIdentity, req: RequestFacts,
  defaultAllow: boolean | null): RefDecision | null {
  const rule = overrideRules(sources).find((r) => sourceMatches(r, caller))
  return rule === undefined ? null : verdict(rule, req, true, 'http', defaultAllow)
}

/** The full request: override, then policy; alternates can only add a deny-permission denial. */
export function referenceRequest (input: PolicyInput, sources: readonly RouteSource[] | null, caller: CallerIdentity,
  req: RequestFacts, alternates: readonly string[]): RefDecision {
  let rule = sources === null ? undefined : overrideRules(sources).find((r) => sourceMatches(r, caller))
  let http = true
  if (rule === undefined) {
    rule = intentionRules(input).find((r) => sourceMatches(r, caller))
    http = HTTP_LIKE.includes(input.protocol.toLowerCase())
  }
  if (rule === undefined) return referenceDecide(input, caller, req)
  const d = verdict(rule, req, http, input.protocol, input.defaultAllow)
  if (!d.allow || rule.permissions === undefined || rule.permissions.length === 0 || !jwtHolds(rule.jwt, req)) return d
  for (const alt of alternates) {
    // A :path matcher reads the alternate spelling with the request's query.
    const query = req.url.includes('?') ? req.url.slice(req.url.indexOf('?')) : ''
    const n = firstPermission(rule, { ...req, url: alt + query }, alt)
    if (n > 0 && rule.permissions[n - 1].Action === 'deny' && jwtHolds(rule.permissions[n - 1].JWT, req)) {
      return { allow: false, reason: `${rule.head}, permission ${n} (deny) for another spelling of the path that reaches the same route` }
    }
  }
  return d
}
