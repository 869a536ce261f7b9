// L7 permission matchers: the HTTP part of one intention permission, compiled once and evaluated
// per request without allocating in the common case. Pure: no I/O, no clock, no Fastify types.
// Rules: docs/semantics.md#permissions, docs/semantics.md#headers, docs/semantics.md#re2, docs/semantics.md#permission-validation.
import { RE2JS } from 're2js'
import { AUTHORITY_MISMATCH_REASON, headerAmbiguity, isHttp2, nameIs, recordRepeated, SINGLE_HTTP1, SINGLE_HTTP2, singleValued } from './headers'
import { canonicalRulePath } from './path'

/** A permission (or route source) that cannot be compiled; the message says exactly what is wrong. */
export class RuleError extends TypeError {}

/** The nine methods Consul accepts in `Methods` (config entries validate against this list). */
export const HTTP_METHODS: readonly string[] = Object.freeze(
  ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'CONNECT', 'OPTIONS', 'TRACE'])

/** How a permission matches the path (docs/semantics.md#permissions); 'none': any path. */
export type PathMatchKind = 'none' | 'exact' | 'prefix' | 'regex'

/** How a header matcher compares the value (docs/semantics.md#headers). */
export type HeaderMatchKind = 'present' | 'exact' | 'prefix' | 'suffix' | 'contains' | 'regex'

/** Where a header matcher reads its value from: pseudo-headers come from the request line. */
export type HeaderSource = 'header' | 'method' | 'path' | 'authority' | 'scheme'

const HTTP_KEYS = new Set(['PathExact', 'PathPrefix', 'PathRegex', 'Methods', 'Header'])
const HEADER_KEYS = new Set(['Name', 'Present', 'Exact', 'Prefix', 'Suffix', 'Contains', 'Regex', 'Invert', 'IgnoreCase'])

/** The fields of a compiled header matcher. */
export interface HeaderMatcherFields {
  /** Lower-case. */
  readonly name: string
  readonly source: HeaderSource
  readonly kind: HeaderMatchKind
  /** UTF-8 bytes as a latin1 string; ASCII-lowercased when ignoreCase. */
  readonly value: string
  /** Set for kind 'regex' only. */
  readonly regex: RE2JS | null
  readonly ignoreCase: boolean
  readonly invert: boolean
}

/** One header matcher of a permission (docs/semantics.md#headers). */
export class HeaderMatcher implements HeaderMatcherFields {
  readonly name: string
  readonly source: HeaderSource
  readonly kind: HeaderMatchKind
  readonly value: string
  readonly regex: RE2JS | null
  readonly ignoreCase: boolean
  readonly invert: boolean
  /** `singleValued(name)`: whether Node keeps this header single-valued, per transport. */
  readonly single: number

  constructor (fields: HeaderMatcherFields) {
    this.name = fields.name
    this.source = fields.source
    this.kind = fields.kind
    this.value = fields.value
    this.regex = fields.regex
    this.ignoreCase = fields.ignoreCase
    this.invert = fields.invert
    this.single = singleValued(fields.name)
  }

  matches (method: string, url: string, rawHeaders: readonly string[]): boolean {
    let v: string | undefined
    const source = this.source
    if (source === 'header') v = headerValue(rawHeaders, this.name, this.single)
    else if (source === 'method') v = method
    else if (source === 'path') v = url
    else if (source === 'authority') v = authorityValue(rawHeaders)
    // Envoy sets `:scheme` on every request: HTTP/2 sends it; HTTP/1.1 has none, and the
    // connection is TLS (docs/semantics.md#headers).
    else v = headerValue(rawHeaders, ':scheme', this.single) ?? 'https'
    if (this.kind === 'present') return (v !== undefined) !== this.invert
    // A missing header never matches a value matcher, inverted or not (docs/semantics.md#headers).
    if (v === undefined) return false
    return this.matchValue(v) !== this.invert
  }

  private matchValue (v: string): boolean {
    const p = this.value
    switch (this.kind) {
      case 'exact':
        return this.ignoreCase ? v.length === p.length && foldedAt(v, 0, p) : v === p
      case 'prefix':
        return this.ignoreCase ? v.length >= p.length && foldedAt(v, 0, p) : v.startsWith(p)
      case 'suffix':
        return this.ignoreCase ? v.length >= p.length && foldedAt(v, v.length - p.length, p) : v.endsWith(p)
      case 'contains':
        return (this.ignoreCase ? asciiLower(v) : v).includes(p)
      default: // 'regex' ('present' returned above)
        return (this.regex as RE2JS).testExact(bytesToText(v))
    }
  }
}

/** The fields of the compiled HTTP part of one permission; null: that part is not set. */
export interface PermissionMatcherFields {
  readonly methods: readonly string[] | null
  readonly pathKind: PathMatchKind
  /** The canonical percent-spelling for 'exact' and 'prefix' (docs/semantics.md#paths-non-ascii); the pattern for 'regex'. */
  readonly pathValue: string
  /** The path rule as written; defaults to `pathValue`. */
  readonly writtenPath?: string
  /** Set for pathKind 'regex' only. */
  readonly pathRegex: RE2JS | null
  readonly headers: readonly HeaderMatcher[] | null
}

/** PermissionMatcher.mismatch() results. */
export const MATCHED = -1
export const MISMATCH_METHOD = 0
export const MISMATCH_PATH = 1
export const MISMATCH_HEADER = 2

/** The compiled HTTP part of one permission: every present part must match (AND). */
export class PermissionMatcher implements PermissionMatcherFields {
  readonly methods: readonly string[] | null
  readonly pathKind: PathMatchKind
  readonly pathValue: string
  readonly pathRegex: RE2JS | null
  readonly headers: readonly HeaderMatcher[] | null
  readonly writtenPath: string

  constructor (fields: PermissionMatcherFields) {
    this.methods = fields.methods
    this.pathKind = fields.pathKind
    this.pathValue = fields.pathValue
    this.pathRegex = fields.pathRegex
    this.headers = fields.headers
    this.writtenPath = fields.writtenPath ?? fields.pathValue
  }

  matches (method: string, path: string, url: string, rawHeaders: readonly string[]): boolean {
    return this.mismatch(method, path, url, rawHeaders) === MATCHED
  }

  /**
   * The first condition that fails, checked in a fixed order: MISMATCH_METHOD, MISMATCH_PATH,
   * then MISMATCH_HEADER + i for header matcher i; MATCHED when all hold. The one evaluation
   * both the decision and its explanation use (docs/semantics.md#rollout-explain).
   */
  mismatch (method: string, path: string, url: string, rawHeaders: readonly string[]): number {
    const methods = this.methods
    if (methods !== null) {
      let found = false
      for (let i = 0; i < methods.length; i++) {
        // Case-sensitive on purpose: Consul stores methods upper-cased and Envoy compares exactly (docs/semantics.md#methods).
        if (methods[i] === method) { found = true; break }
      }
      if (!found) return MISMATCH_METHOD
    }
    switch (this.pathKind) {
      case 'exact': if (path !== this.pathValue) return MISMATCH_PATH; break
      case 'prefix': if (!path.startsWith(this.pathValue)) return MISMATCH_PATH; break
      case 'regex': if (!(this.pathRegex as RE2JS).testExact(bytesToText(path))) return MISMATCH_PATH; break
    }
    const headers = this.headers
    if (headers !== null) {
      for (let i = 0; i < headers.length; i++) {
        if (!headers[i].matches(method, url, rawHeaders)) return MISMATCH_HEADER + i
      }
    }
    return MATCHED
  }
}

/**
 * The value of header `lname` (lower-case) in Node's `rawHeaders` as the application reads it
 * (docs/semantics.md#headers): repeated values joined with ',' as Envoy does, `cookie` crumbs with
 * '; ' as HTTP/2 requires; for a name Node keeps single-valued (`single`, see `singleValued()`),
 * the first value, and the repetition is recorded (docs/semantics.md#transport-headers).
 * `undefined` when absent. Returns the stored string when it occurs once.
 */
export function headerValue (raw: readonly string[], lname: string, single = 0): string | undefined {
  let first: string | undefined
  let joined: string | undefined
  for (let i = 0; i + 1 < raw.length; i += 2) {
    if (nameIs(raw[i], lname)) {
      if (first === undefined) {
        first = raw[i + 1]
      } else if (single !== 0 && (single & (isHttp2(raw) ? SINGLE_HTTP2 : SINGLE_HTTP1)) !== 0) {
        recordRepeated(lname)
        return first
      } else {
        joined = (joined === undefined ? first : joined) + (lname === 'cookie' ? '; ' : ',') + raw[i + 1]
      }
    }
  }
  return joined === undefined ? first : joined
}

const SINGLE_BOTH = SINGLE_HTTP1 | SINGLE_HTTP2

/**
 * `Host` and `:authority` are one header to Envoy: HTTP/2 carries ':authority', HTTP/1 'host'.
 * Fastify reads `host` first; when an HTTP/2 request carries both and they differ, that is the
 * value, and the disagreement is recorded (docs/semantics.md#transport-headers).
 */
function authorityValue (raw: readonly string[]): string | undefined {
  const host = headerValue(raw, 'host', SINGLE_BOTH)
  const authority = headerValue(raw, ':authority', SINGLE_BOTH)
  if (authority === undefined) return host
  if (host !== undefined && host !== authority) {
    headerAmbiguity.reason = AUTHORITY_MISMATCH_REASON
    return host
  }
  return authority
}

/** Whether `v` holds the ASCII-lowercased `p` at `offset`, ignoring ASCII case (Envoy ignore_case). */
function foldedAt (v: string, offset: number, p: string): boolean {
  for (let i = 0; i < p.length; i++) {
    let c = v.charCodeAt(offset + i)
    if (c >= 65 && c <= 90) c += 32
    if (c !== p.charCodeAt(i)) return false
  }
  return true
}

/** ASCII-only lowercasing (Envoy's ignore_case is ASCII-only); returns `s` itself when unchanged. */
export function asciiLower (s: string): string {
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i)
    if (c >= 65 && c <= 90) return s.replace(/[A-Z]+/g, (m) => m.toLowerCase())
  }
  return s
}

/**
 * Node hands header values and the request target over as latin1 strings (one char per byte),
 * while Envoy's RE2 reads those bytes as UTF-8: decode before a regex sees them.
 */
function bytesToText (v: string): string {
  for (let i = 0; i < v.length; i++) {
    const c = v.charCodeAt(i)
    if (c >= 0x80) return c > 0xff || !isLatin1(v, i) ? v : Buffer.from(v, 'latin1').toString('utf8')
  }
  return v
}

function isLatin1 (v: string, from: number): boolean {
  for (let i = from; i < v.length; i++) if (v.charCodeAt(i) > 0xff) return false
  return true
}

/** A rule string as the bytes Envoy compares (UTF-8), spelled one char per byte like Node's values. */
function ruleBytes (s: string): string {
  // eslint-disable-next-line no-control-regex
  return /^[\x00-\x7f]*$/.test(s) ? s : Buffer.from(s, 'utf8').toString('latin1')
}

/**
 * The bound on an RE2 program's size that Consul gives its Envoy proxies (the bootstrap's runtime
 * key re2.max_program_size.error_level): any regex Consul's sidecars accept compiles here too
 * (docs/semantics.md#paths-regex-size).
 */
export const DEFAULT_MAX_REGEX_PROGRAM_SIZE = 1_048_576

/**
 * Above this program size a match can cost re2js tens of microseconds to hundreds of milliseconds
 * on a long path or header (measured, README "Regex cost"): such a pattern loads, with a warning.
 */
export const COSTLY_REGEX_PROGRAM_SIZE = 1_000

/**
 * Compiled patterns shared within one compilation (a compiled RE2 program costs ~5 KiB), and the
 * largest program size that compilation accepts.
 */
export class RegexCache extends Map<string, RE2JS> {
  /** One warning per costly pattern compiled (COSTLY_REGEX_PROGRAM_SIZE). */
  readonly costly: string[] = []

  constructor (readonly maxProgramSize: number = DEFAULT_MAX_REGEX_PROGRAM_SIZE) {
    super()
  }
}

/**
 * Compile an RE2 pattern; a pattern RE2 rejects, or whose program is larger than the cache's
 * bound, fails here, at compile time (docs/semantics.md#re2, docs/semantics.md#paths-regex-size).
 */
export function compileRegex (pattern: string, where: string, cache: RegexCache): RE2JS {
  let re = cache.get(pattern)
  if (re !== undefined) return re
  try {
    re = RE2JS.compile(pattern)
  } catch (err) {
    throw new RuleError(`${where} ${JSON.stringify(pattern)} is not a valid RE2 regular expression: ${(err as Error).message}`)
  }
  // RE2 matches in linear time, but per input byte in proportion to its program: above the bound
  // (an operator's choice, or Consul's own for Envoy) it is refused, as Envoy refuses it.
  const size = re.programSize()
  if (size > cache.maxProgramSize) {
    throw new RuleError(`${where} ${JSON.stringify(pattern)} compiles to an RE2 program of size ${size}, above the limit of ` +
      `${cache.maxProgramSize} (raise it with the maxRegexProgramSize option)`)
  }
  if (size > COSTLY_REGEX_PROGRAM_SIZE) {
    cache.costly.push(`${where} ${JSON.stringify(pattern)} compiles to an RE2 program of size ${size}: matching it can ` +
      'cost from tens of microseconds to hundreds of milliseconds per request on a long path or header ' +
      `(set maxRegexProgramSize below ${size} to refuse it)`)
  }
  cache.set(pattern, re)
  return re
}

export function isObject (v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v)
}

function checkKeys (o: Record<string, unknown>, known: Set<string>, where: string): void {
  for (const k of Object.keys(o)) {
    if (!known.has(k)) throw new RuleError(`${where}.${k} is not a known field (${[...known].join(', ')})`)
  }
}

/** An optional string field: absent, null and '' all count as unset, as in Consul. */
function optString (o: Record<string, unknown>, key: string, where: string): string {
  const v = o[key]
  if (v === undefined || v === null) return ''
  if (typeof v !== 'string') throw new RuleError(`${where}.${key} must be a string`)
  return v
}

function optBool (o: Record<string, unknown>, key: string, where: string): boolean {
  const v = o[key]
  if (v === undefined || v === null) return false
  if (typeof v !== 'boolean') throw new RuleError(`${where}.${key} must be a boolean`)
  return v
}

/**
 * Compile the `HTTP` block of a permission. `strict` applies every rule Consul checks when a
 * config entry is written (route overrides are written by hand); otherwise (data Consul already
 * validated) only what is needed to evaluate it unambiguously is checked, so an update from a
 * newer Consul is not rejected for a rule the plugin can still enforce. Unknown fields are
 * rejected in both modes: ignoring a criterion would widen what an allow permission allows.
 */
export function compileHttp (http: unknown, where: string, strict: boolean, cache: RegexCache, denies = false): PermissionMatcher {
  if (http === undefined || http === null) {
    if (strict) throw new RuleError(`${where} is required`)
    // Envoy turns a permission with no parts into "any request"; Consul never sends one.
    return new PermissionMatcher({ methods: null, pathKind: 'none', pathValue: '', pathRegex: null, headers: null })
  }
  if (!isObject(http)) throw new RuleError(`${where} must be an object`)
  checkKeys(http, HTTP_KEYS, where)

  const exact = optString(http, 'PathExact', where)
  const prefix = optString(http, 'PathPrefix', where)
  const regex = optString(http, 'PathRegex', where)
  if ((exact !== '' ? 1 : 0) + (prefix !== '' ? 1 : 0) + (regex !== '' ? 1 : 0) > 1) {
    throw new RuleError(`${where} must set at most one of PathExact, PathPrefix, PathRegex`)
  }
  let pathKind: PathMatchKind = 'none'
  let pathValue = ''
  let pathRegex: RE2JS | null = null
  if (exact !== '') {
    // Request paths are compared percent-encoded: a literal rule is spelled the same way (docs/semantics.md#paths-non-ascii).
    pathKind = 'exact'
    pathValue = canonicalRulePath(exact)
    if (strict && !exact.startsWith('/')) throw new RuleError(`${where}.PathExact must start with "/"`)
  } else if (prefix !== '') {
    pathKind = 'prefix'
    pathValue = canonicalRulePath(prefix)
    if (strict && !prefix.startsWith('/')) throw new RuleError(`${where}.PathPrefix must start with "/"`)
  } else if (regex !== '') {
    pathKind = 'regex'
    pathValue = regex
    pathRegex = compileRegex(regex, `${where}.PathRegex`, cache)
  }

  const methods = compileMethods(http.Methods, `${where}.Methods`, strict)
  // Fastify answers HEAD with the GET route's handler (exposeHeadRoutes): a deny that names GET
  // names HEAD too, or the denied handler would run for HEAD (docs/semantics.md#methods).
  if (denies && methods !== null && methods.includes('GET') && !methods.includes('HEAD')) methods.push('HEAD')
  const headers = compileHeaders(http.Header, `${where}.Header`, cache)

  if (strict && pathKind === 'none' && methods === null && headers === null) {
    throw new RuleError(`${where} must set at least one of PathExact, PathPrefix, PathRegex, Methods, Header`)
  }
  const writtenPath = exact !== '' ? exact : prefix !== '' ? prefix : regex
  return new PermissionMatcher({ methods, pathKind, pathValue, pathRegex, headers, writtenPath })
}

function compileMethods (v: unknown, where: string, strict: boolean): string[] | null {
  if (v === undefined || v === null) return null
  if (!Array.isArray(v)) throw new RuleError(`${where} must be an array of method names`)
  if (v.length === 0) return null
  const out: string[] = []
  for (let i = 0; i < v.length; i++) {
    const m: unknown = v[i]
    if (typeof m !== 'string') throw new RuleError(`${where}[${i}] must be a string`)
    if (!strict) { out.push(m); continue }
    // Consul upper-cases methods when it stores an entry; requests are then compared exactly.
    const upper = m.toUpperCase()
    if (!HTTP_METHODS.includes(upper)) {
      throw new RuleError(`${where}[${i}] ${JSON.stringify(m)} is not one of ${HTTP_METHODS.join(', ')}`)
    }
    if (out.includes(upper)) throw new RuleError(`${where}[${i}] repeats ${upper}`)
    out.push(upper)
  }
  return out
}

function compileHeaders (v: unknown, where: string, cache: RegexCache): HeaderMatcher[] | null {
  if (v === undefined || v === null) return null
  if (!Array.isArray(v)) throw new RuleError(`${where} must be an array of header matchers`)
  if (v.length === 0) return null
  const out: HeaderMatcher[] = []
  for (let i = 0; i < v.length; i++) out.push(compileHeader(v[i], `${where}[${i}]`, cache))
  return out
}

const VALUE_MATCHERS: ReadonlyArray<readonly [string, HeaderMatchKind]> =
  [['Exact', 'exact'], ['Prefix', 'prefix'], ['Suffix', 'suffix'], ['Contains', 'contains'], ['Regex', 'regex']]

function compileHeader (h: unknown, where: string, cache: RegexCache): HeaderMatcher {
  if (!isObject(h)) throw new RuleError(`${where} must be an object`)
  checkKeys(h, HEADER_KEYS, where)
  const name = optString(h, 'Name', where)
  if (name === '') throw new RuleError(`${where}.Name must be a non-empty string`)
  const present = optBool(h, 'Present', where)
  const invert = optBool(h, 'Invert', where)
  const ignoreCase = optBool(h, 'IgnoreCase', where)
  const values: Array<[HeaderMatchKind, string]> = []
  if (present) values.push(['present', ''])
  for (const [key, kind] of VALUE_MATCHERS) {
    const s = optString(h, key, where)
    if (s !== '') values.push([kind, s])
  }
  if (values.length !== 1) {
    throw new RuleError(`${where} must set exactly one of Present, Exact, Prefix, Suffix, Contains, Regex`)
  }
  const [kind, value] = values[0]
  if (ignoreCase && (kind === 'present' || kind === 'regex')) {
    throw new RuleError(`${where}.IgnoreCase is only allowed with Exact, Prefix, Suffix or Contains`)
  }
  const lname = asciiLower(name)
  const source: HeaderSource = lname === ':method'
    ? 'method'
    : lname === ':path' ? 'path' : lname === 'host' || lname === ':authority' ? 'authority' : lname === ':scheme' ? 'scheme' : 'header'
  const regex = kind === 'regex' ? compileRegex(value, `${where}.Regex`, cache) : null
  const bytes = kind === 'regex' ? value : ruleBytes(value)
  return new HeaderMatcher({ name: lname, source, kind, value: ignoreCase ? asciiLower(bytes) : bytes, regex, ignoreCase, invert })
}

/** Whether the escapes of `path` have hex letters in both cases (`%2F%3b`, `%aF`). */
function mixedCaseEscapes (path: string): boolean {
  const escapes = path.match(/%[0-9A-Fa-f]{2}/g) ?? []
  return escapes.some((e) => /[A-F]/.test(e)) && escapes.some((e) => /[a-f]/.test(e))
}

/**
 * What a path rule does not do as its author may expect, for a load-time warning, or null:
 * `PathExact`/`PathPrefix` with characters request paths never carry literally are compared
 * percent-encoded (Envoy compares them as written and never matches them;
 * docs/semantics.md#paths-non-ascii); one with escapes in both hex cases matches only requests
 * spelled so, since the other spellings checked have every escape in one case
 * (docs/semantics.md#path-normalization); a `PathRegex` with a non-ASCII character can only match
 * percent-encoded text.
 */
export function pathRuleNote (m: PermissionMatcher): string | null {
  if (m.pathKind === 'regex') {
    // eslint-disable-next-line no-control-regex
    return /[^\x00-\x7f]/.test(m.pathValue)
      ? `PathRegex ${JSON.stringify(m.pathValue)} has non-ASCII characters, but request paths are matched percent-encoded (write them as %XX escapes of their UTF-8 bytes)`
      : null
  }
  const kind = m.pathKind === 'exact' ? 'PathExact' : 'PathPrefix'
  if (m.writtenPath !== m.pathValue) {
    return `${kind} ${JSON.stringify(m.writtenPath)} is compared as ${JSON.stringify(m.pathValue)}, ` +
      'the percent-encoded spelling request paths are compared in; Envoy compares it as written and never matches it: write it encoded'
  }
  if (mixedCaseEscapes(m.pathValue)) {
    return `${kind} ${JSON.stringify(m.pathValue)} has escapes in both hex cases: it matches only requests that spell them so ` +
      '(a deny written in one case also covers the other case): write its escapes in one case'
  }
  return null
}
