// Request path canonicalization for L7 matching (docs/semantics.md#path-normalization): the path Envoy's HTTP
// connection manager would hand to its RBAC filter, plus the other spellings Fastify's router
// (find-my-way) treats as the same route. Pure functions; the common case allocates nothing.
import type { RequestNormalization } from '../agent/wire'

// Per byte: what the canonical form does with it (the classes Envoy's path normalizer uses).
const UNRESERVED = 1 // %XX of it is decoded: ALPHA DIGIT - . _ ~ (RFC 3986 unreserved)
const ESCAPE = 2 // a literal one is percent-encoded: controls, space, " < > ^ ` { | } DEL, non-ASCII
const INVALID = 4 // NUL, literal or escaped: the path is rejected
const SUB_DELIM = 8 // ! ' ( ) * [ ]: find-my-way decodes their escapes, the canonical form does not
const CLASS = new Uint8Array(256)
for (let c = 0; c < 0x20; c++) CLASS[c] = ESCAPE
CLASS[0] = INVALID
for (const ch of ' "#<>?^`{|}') CLASS[ch.charCodeAt(0)] = ESCAPE
for (let c = 0x7f; c < 0x100; c++) CLASS[c] = ESCAPE
for (const ch of '-._~') CLASS[ch.charCodeAt(0)] = UNRESERVED
for (let c = 48; c < 58; c++) CLASS[c] = UNRESERVED
for (let c = 65; c < 91; c++) { CLASS[c] = UNRESERVED; CLASS[c + 32] = UNRESERVED }
for (const ch of "!'()*[]") CLASS[ch.charCodeAt(0)] = SUB_DELIM

const HEX = '0123456789ABCDEF'

const SLASHES_KEEP = 0
const SLASHES_UNESCAPE = 1
const SLASHES_REJECT = 2

const ESCAPED_SLASH = /%(?:2f|5c)/i
const ESCAPED_SLASH_ALL = /%(?:2f|5c)/gi
const SLASH_RUN = /\/{2,}/g

/**
 * The path an intention's path matchers are compared with: query and fragment stripped, then
 * normalized like Envoy with Consul's mesh `RequestNormalization` (`null`: Consul's defaults):
 * escaped slashes per `PathWithEscapedSlashesAction` (kept by default), then unless
 * `InsecureDisablePathNormalization`: `\` → `/`, `%XX` of unreserved characters decoded, other
 * escapes left as written, characters a path may not carry percent-encoded, `.`/`..` segments
 * resolved; then `MergeSlashes`. Returns `null` when the request must be rejected (400): an
 * escaped slash under `REJECT_REQUEST`, a NUL, a malformed `%` escape (the router refuses those
 * too), or a target that is neither origin-form nor an http(s) absolute-form URL.
 * Returns `url` itself when it is already canonical.
 */
export function canonicalPath (url: string, normalization: RequestNormalization | null): string | null {
  const normalize = normalization === null || normalization.InsecureDisablePathNormalization !== true
  const merge = normalization !== null && normalization.MergeSlashes === true
  const action = normalization === null ? undefined : normalization.PathWithEscapedSlashesAction
  const slashes = action === 'REJECT_REQUEST'
    ? SLASHES_REJECT
    : action === 'UNESCAPE_AND_FORWARD' || action === 'UNESCAPE_AND_REDIRECT' ? SLASHES_UNESCAPE : SLASHES_KEEP
  const end = canonicalEnd(url, normalize, merge, slashes !== SLASHES_KEEP)
  if (end === url.length) return url
  if (end > 0) return url.slice(0, end)
  return slowCanonical(url, normalize, merge, slashes)
}

/**
 * A scan that proves the path part of `url` needs no change, so the usual request allocates
 * nothing: returns where that path ends (the first '?' or '#', or the length), or -1.
 */
function canonicalEnd (url: string, normalize: boolean, merge: boolean, slashes: boolean): number {
  const n = url.length
  if (n === 0 || url.charCodeAt(0) !== 47) return -1
  for (let i = 1; i < n; i++) {
    const c = url.charCodeAt(i)
    if (c === 63 || c === 35) return i // '?' '#': the rest is not path
    if (c === 47) {
      if (merge && url.charCodeAt(i + 1) === 47) return -1
      continue
    }
    if (c === 37) {
      if (normalize || slashes) return -1
      continue
    }
    if (!normalize) continue
    if (c === 92 || c > 0xff || (CLASS[c] & (ESCAPE | INVALID)) !== 0) return -1
    if (c === 46 && url.charCodeAt(i - 1) === 47 && (segmentEnds(url, i + 1) ||
      (url.charCodeAt(i + 1) === 46 && segmentEnds(url, i + 2)))) return -1 // a '.' or '..' segment
  }
  return n
}

function segmentEnds (url: string, i: number): boolean {
  if (i === url.length) return true
  const c = url.charCodeAt(i)
  return c === 47 || c === 63 || c === 35
}

function slowCanonical (url: string, normalize: boolean, merge: boolean, slashes: number): string | null {
  let path = pathPart(url)
  if (path === null) return null
  if (slashes !== SLASHES_KEEP && ESCAPED_SLASH.test(path)) {
    if (slashes === SLASHES_REJECT) return null
    // Envoy unescapes before normalizing, so a decoded '%5C' then becomes '/' as well.
    path = path.replace(ESCAPED_SLASH_ALL, (m) => (m.charCodeAt(1) === 50 ? '/' : '\\'))
  }
  if (normalize) {
    const spelled = percentNormalize(path, true)
    if (spelled === null) return null
    path = removeDotSegments(spelled)
  }
  if (merge) path = path.replace(SLASH_RUN, '/')
  return path === url ? url : path
}

/**
 * Where the path of a request target starts: 0 in origin form; after the authority in http(s)
 * absolute form (a request sent as to a proxy: find-my-way routes its path, so must we); -1 for
 * anything else.
 */
function pathStart (url: string): number {
  if (url.charCodeAt(0) === 47) return 0
  const m = /^https?:\/\/[^/?#]+/i.exec(url)
  return m === null ? -1 : m[0].length
}

/**
 * The authority of an http(s) absolute-form target, without user info, as `pathStart` delimits it;
 * for a target `canonicalPath` accepted and that does not start with '/'.
 */
export function targetAuthority (url: string): string {
  const authority = url.slice(url.indexOf('//') + 2, pathStart(url))
  return authority.slice(authority.lastIndexOf('@') + 1)
}

/** The path of an origin-form or http(s) absolute-form request target, without query/fragment. */
function pathPart (url: string): string | null {
  const start = pathStart(url)
  if (start === -1) return null
  let end = url.length
  for (let i = start; i < end; i++) {
    const c = url.charCodeAt(i)
    if (c === 63 || c === 35) { end = i; break }
  }
  return start === end ? '/' : url.slice(start, end)
}

/**
 * Percent-encoding in canonical spelling: unreserved escapes decoded, other escapes left as
 * written, characters that must be escaped escaped (upper-case hex; non-ASCII as its bytes),
 * optionally `\` → `/`.
 */
function percentNormalize (path: string, backslashToSlash: boolean): string | null {
  let out = ''
  let last = 0
  for (let i = 0; i < path.length; i++) {
    const c = path.charCodeAt(i)
    let rep: string
    if (c === 37) {
      const b = hexByte(path, i + 1)
      if (b <= 0) return null // malformed escape or %00
      i += 2
      // Any other escape stays as written, hex case included: Envoy's normalizer keeps it so.
      if ((CLASS[b] & UNRESERVED) === 0) continue
      out += path.slice(last, i - 2) + String.fromCharCode(b)
      last = i + 1
      continue
    }
    if (c === 92) {
      if (!backslashToSlash) continue
      rep = '/'
    } else if (c > 0xff) {
      // Node's targets are latin1 (one char per byte); anything wider is encoded as UTF-8 bytes.
      const cp = path.codePointAt(i) as number
      rep = utf8Escaped(cp)
      if (cp > 0xffff) {
        out += path.slice(last, i) + rep
        i++
        last = i + 1
        continue
      }
    } else {
      const k = CLASS[c]
      if ((k & INVALID) !== 0) return null
      if ((k & ESCAPE) === 0) continue
      rep = escapeByte(c)
    }
    out += path.slice(last, i) + rep
    last = i + 1
  }
  return last === 0 ? path : out + path.slice(last)
}

/** The byte of a two-hex-digit escape starting at `i`, or -1. */
function hexByte (s: string, i: number): number {
  const h = hexDigit(s.charCodeAt(i))
  const l = hexDigit(s.charCodeAt(i + 1))
  return h < 0 || l < 0 ? -1 : (h << 4) | l
}

function hexDigit (c: number): number {
  if (c >= 48 && c <= 57) return c - 48
  if (c >= 65 && c <= 70) return c - 55
  if (c >= 97 && c <= 102) return c - 87
  return -1
}

function escapeByte (b: number): string {
  return '%' + HEX[b >> 4] + HEX[b & 15]
}

/** RFC 3986 dot-segment removal; `..` never climbs above the root. */
function removeDotSegments (path: string): string {
  if (!path.includes('/.')) return path
  const segments = path.split('/')
  const out: string[] = []
  const lastIndex = segments.length - 1
  for (let i = 1; i <= lastIndex; i++) {
    const s = segments[i]
    if (s === '.' || s === '..') {
      if (s === '..') out.pop()
      // A trailing dot segment still names a directory: keep its slash.
      if (i === lastIndex) out.push('')
    } else {
      out.push(s)
    }
  }
  return '/' + out.join('/')
}

/** The Fastify router options that make several spellings of a path reach one handler. */
export interface RouterOptions {
  ignoreTrailingSlash: boolean
  ignoreDuplicateSlashes: boolean
  caseSensitive: boolean
  useSemicolonDelimiter: boolean
}

const NO_PATHS: readonly string[] = Object.freeze([])

// Characters that find-my-way decodes (decodeURI) but the canonical form keeps as spelled, so
// `(` and `%28` reach the same static route while canonicalizing differently.
const SUB_DELIM_LITERAL = /[!'()*[\]]/g
const SUB_DELIM_ESCAPED = /%(?:2[1789A]|5[BD])/gi
const SUB_DELIM_ANY = /[!'()*[\]%]/

/**
 * The other spellings of the canonical `path` that Fastify's router sends to the same handler
 * (docs/semantics.md#router-spellings): the router's own lookup key under `router` (semicolon cut,
 * duplicate slashes removed, trailing slash trimmed and re-added, lower-cased), the `(`/`%28`-style
 * spellings of the characters find-my-way decodes, and, when the raw `url` is given, the router's
 * view of it: dot segments, backslashes and escaped slashes left as sent, and, when the target
 * carries escapes or non-ASCII, find-my-way's own decoded path, folded exactly as the router folds
 * it (`toLowerCase` on the *decoded* text, docs/semantics.md#paths-unicode-case) and the path with
 * reserved escapes decoded the way route parameters are (docs/semantics.md#paths-parameters), each
 * spelled canonically. The hook evaluates each as an alternate path (see `decideSpellings`): an
 * alternate can only add a denial from a deny permission. Returns a shared empty array when
 * nothing applies. `urlIsPath`: the caller already knows `url` is `path` plus a query or fragment;
 * `plainTarget`: it also knows whether that holds and `path` is spelled plainly (`isPlainTarget`).
 */
export function routerPaths (path: string, router: RouterOptions, url?: string, urlIsPath = false, plainTarget?: boolean): readonly string[] {
  const plain = !router.ignoreTrailingSlash && !router.ignoreDuplicateSlashes && router.caseSensitive &&
    !router.useSemicolonDelimiter
  // The common case in one scan: the target is this path (plus a query) and spells nothing the
  // router would read differently.
  if (plain && (plainTarget ?? ((urlIsPath || url === undefined || sameTarget(url, path)) && isPlainSpelling(path)))) return NO_PATHS
  // Not skipped when url === path: with normalization disabled the raw path is not percent-canonical.
  let routed = url === undefined ? null : routedSpelling(url)
  if (routed === path) routed = null
  const decoded = url === undefined ? null : routerDecodedPath(url, router.useSemicolonDelimiter)
  if (plain && routed === null && decoded === null && !SUB_DELIM_ANY.test(path)) return NO_PATHS
  const out: string[] = []
  addVariants(out, path, path, router)
  if (routed !== null) addVariants(out, path, routed, router)
  if (decoded !== null) {
    const reserved = decodedHasReservedEscape
    addDecodedVariants(out, path, decoded, router, false)
    if (reserved) {
      // What a route parameter holds: find-my-way decodes the reserved escapes it left in the path.
      const param = decodeReservedEscapes(decoded)
      addDecodedVariants(out, path, param, router, true)
      const resolved = removeDotSegments(param)
      if (resolved !== param) addDecodedVariants(out, path, resolved, router, true)
    }
  }
  return out.length === 0 ? NO_PATHS : out
}

// Set by routerDecodedPath: whether an escape of a reserved character is left in its result.
let decodedHasReservedEscape = false
const RESERVED_ESCAPE = /%(?:2[3-6BbCcFf]|3[AaBbDdFf]|40)/
const RESERVED_ESCAPE_ALL = /%(?:2[3-6BbCcFf]|3[AaBbDdFf]|40)/g
const PERCENT_25 = /%25/g

/**
 * find-my-way's decoded path for a request target (its `safeDecodeURI`), when the target carries
 * an escape or a non-ASCII character; null otherwise, and when the router would refuse the target.
 * The path ends at the first `?` or `#` (or `;` with `useSemicolonDelimiter`); escapes of the
 * reserved characters `# $ % & + , / : ; = ? @` are kept as written, every other escape is decoded
 * as UTF-8 (`decodeURI`; an escape that is not UTF-8 makes the router answer 400).
 */
function routerDecodedPath (url: string, semicolon: boolean): string | null {
  const start = pathStart(url)
  if (start === -1) return null
  let end = url.length
  let special = false
  for (let i = start + 1; i < end; i++) {
    const c = url.charCodeAt(i)
    if (c === 63 || c === 35 || (c === 59 && semicolon)) { end = i; break }
    if (c === 37 || c >= 0x80) special = true
  }
  if (!special) return null
  let path = url.slice(start, end)
  decodedHasReservedEscape = RESERVED_ESCAPE.test(path)
  if (path.includes('%')) {
    try {
      // find-my-way re-escapes '%25' first so decodeURI leaves it as it was.
      path = decodeURI(path.replace(PERCENT_25, '%2525'))
    } catch {
      return null
    }
  }
  return path
}

/** find-my-way's `safeDecodeURIComponent` on a decoded path: the reserved escapes it kept, decoded. */
function decodeReservedEscapes (path: string): string {
  return path.replace(RESERVED_ESCAPE_ALL, (m) => String.fromCharCode(parseInt(m.slice(1), 16)))
}

/**
 * Decoded text spelled canonically: non-ASCII as upper-case UTF-8 escapes, characters a path may
 * not carry literally escaped, escapes left in the text as written (or, with `literalPercent`,
 * every `%` written `%25`: the text is fully decoded).
 */
function spellDecoded (text: string, literalPercent: boolean): string {
  let out = ''
  let last = 0
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i)
    let rep: string
    if (c === 37) {
      if (!literalPercent) {
        // Only escapes of reserved characters survive decodeURI, each valid: left as written.
        i += 2
        continue
      }
      rep = '%25'
    } else if (c >= 0x80) {
      const cp = text.codePointAt(i) as number
      rep = utf8Escaped(cp)
      if (cp > 0xffff) {
        out += text.slice(last, i) + rep
        i++
        last = i + 1
        continue
      }
    } else if ((CLASS[c] & (ESCAPE | INVALID)) !== 0) {
      rep = escapeByte(c)
    } else {
      continue
    }
    out += text.slice(last, i) + rep
    last = i + 1
  }
  return last === 0 ? text : out + text.slice(last)
}

/**
 * A `PathExact`/`PathPrefix` rule in the alphabet request paths are compared in
 * (docs/semantics.md#paths-non-ascii): non-ASCII characters as upper-case UTF-8 escapes, and the
 * characters a canonical path never carries literally escaped. Escapes the rule already has are
 * left as written. Returns `rule` itself when nothing changes.
 */
export function canonicalRulePath (rule: string): string {
  let out = ''
  let last = 0
  for (let i = 0; i < rule.length; i++) {
    const c = rule.charCodeAt(i)
    if (c < 0x80 && (c === 37 || (CLASS[c] & (ESCAPE | INVALID)) === 0)) continue
    let rep: string
    if (c >= 0x80) {
      const cp = rule.codePointAt(i) as number
      rep = utf8Escaped(cp)
      out += rule.slice(last, i) + rep
      if (cp > 0xffff) i++
      last = i + 1
      continue
    }
    rep = escapeByte(c)
    out += rule.slice(last, i) + rep
    last = i + 1
  }
  return last === 0 ? rule : out + rule.slice(last)
}

function sameTarget (url: string, path: string): boolean {
  if (url === path) return true
  const c = url.charCodeAt(path.length)
  return (c === 63 || c === 35) && url.startsWith(path)
}

/**
 * The request target is `path` (plus a query or fragment; `urlIsPath`, see isPathOf) and `path`
 * has no escape, no character to escape and no sub-delimiter: the router dispatches on `path`
 * itself (its options may still fold it; routerPaths lists those forms).
 */
export function isPlainTarget (path: string, urlIsPath: boolean): boolean {
  return urlIsPath && isPlainSpelling(path)
}

/** No escape, no character to escape and no sub-delimiter: every spelling of it is this one. */
function isPlainSpelling (path: string): boolean {
  for (let i = 0; i < path.length; i++) {
    const c = path.charCodeAt(i)
    if (c === 37 || c > 0xff || (CLASS[c] & (ESCAPE | INVALID | SUB_DELIM)) !== 0) return false
  }
  return true
}

/**
 * The raw target's path as the router structures it (dot segments, backslashes and escaped
 * slashes left as sent), in canonical percent-spelling, when it differs from `path` (the canonical
 * path); null otherwise. A request is served only if this spelling, too, is allowed: the router
 * dispatches on it. A plain target (`isPlainTarget`) routes as `path`.
 */
export function routedIfOther (url: string, path: string, plainTarget: boolean): string | null {
  if (plainTarget) return null
  const routed = routedSpelling(url)
  return routed === path ? null : routed
}

/** The raw target's path as the router structures it, in canonical percent-spelling. */
function routedSpelling (url: string): string | null {
  const path = pathPart(url)
  return path === null ? null : percentNormalize(path, false)
}

function addVariants (out: string[], primary: string, base: string, router: RouterOptions): void {
  let s = base
  if (router.useSemicolonDelimiter) {
    const cut = s.indexOf(';')
    if (cut >= 0) {
      add(out, primary, s)
      s = s.slice(0, cut)
    }
  }
  for (const f of routerForms(s, router)) {
    add(out, primary, f)
    if (SUB_DELIM_ANY.test(f)) {
      add(out, primary, f.replace(SUB_DELIM_ESCAPED, (m) => String.fromCharCode(parseInt(m.slice(1), 16))))
      add(out, primary, f.replace(SUB_DELIM_LITERAL, (m) => escapeByte(m.charCodeAt(0))))
    }
  }
}

// An escape with a hex letter (whose case can differ), and every escape.
const HEX_LETTER_ESCAPE = /%(?:[0-9A-Fa-f][A-Fa-f]|[A-Fa-f][0-9])/
const ESCAPE_ALL = /%[0-9A-Fa-f]{2}/g

/** A code point as the percent-escapes of its UTF-8 bytes, as request paths carry it. */
function utf8Escaped (cp: number): string {
  let out = ''
  for (const b of Buffer.from(String.fromCodePoint(cp), 'utf8')) out += escapeByte(b)
  return out
}

/**
 * The keys the router may look `s` up under: duplicate slashes removed, trailing slash trimmed and
 * re-added, each also lower-cased with `toLowerCase` as find-my-way does, per the router options.
 */
function routerForms (s: string, router: RouterOptions): string[] {
  const forms = [s]
  if (router.ignoreDuplicateSlashes) forms.push(s.replace(SLASH_RUN, '/'))
  if (router.ignoreTrailingSlash) {
    const key = forms[forms.length - 1]
    const trimmed = key.length > 1 && key.endsWith('/') ? key.slice(0, -1) : key
    forms.push(trimmed)
    if (trimmed !== '/') forms.push(trimmed + '/')
  }
  if (!router.caseSensitive) {
    for (let i = forms.length - 1; i >= 0; i--) forms.push(forms[i].toLowerCase())
  }
  return forms
}

/**
 * The router's lookup keys for a decoded path: duplicate slashes removed, trailing slash trimmed
 * and re-added, lower-cased with `toLowerCase` on the decoded text as find-my-way does (so
 * U+212A KELVIN SIGN folds to `k`), each then spelled canonically.
 */
function addDecodedVariants (out: string[], primary: string, decoded: string, router: RouterOptions, literalPercent: boolean): void {
  for (const f of routerForms(decoded, router)) {
    const spelled = spellDecoded(f, literalPercent)
    add(out, primary, spelled)
    if (SUB_DELIM_ANY.test(spelled)) add(out, primary, spelled.replace(SUB_DELIM_LITERAL, (m) => escapeByte(m.charCodeAt(0))))
  }
}

/**
 * Adds a spelling, and the same with every escape in upper-case and in lower-case hex: Envoy
 * compares escapes as written, so a deny written in one case would miss the other, while the
 * router and route parameters decode both alike (the primary's own other cases too).
 */
function add (out: string[], primary: string, s: string): void {
  push(out, primary, s)
  if (!HEX_LETTER_ESCAPE.test(s)) return
  push(out, primary, s.replace(ESCAPE_ALL, (m) => m.toUpperCase()))
  push(out, primary, s.replace(ESCAPE_ALL, (m) => m.toLowerCase()))
}

function push (out: string[], primary: string, s: string): void {
  if (s !== primary && !out.includes(s)) out.push(s)
}

/** The query of `url` with its '?'; '' when there is none. */
export function queryOf (url: string): string {
  const q = url.indexOf('?')
  return q === -1 ? '' : url.slice(q)
}
