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
 * escapes upper-cased, characters a path may not carry percent-encoded, `.`/`..` segments
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

/** The path of an origin-form or http(s) absolute-form request target, without query/fragment. */
function pathPart (url: string): string | null {
  let start = 0
  if (url.charCodeAt(0) !== 47) {
    // Absolute form (a request sent as to a proxy): find-my-way routes its path, so must we.
    const m = /^https?:\/\/[^/?#]+/i.exec(url)
    if (m === null) return null
    start = m[0].length
  }
  let end = url.length
  for (let i = start; i < end; i++) {
    const c = url.charCodeAt(i)
    if (c === 63 || c === 35) { end = i; break }
  }
  return start === end ? '/' : url.slice(start, end)
}

/**
 * Percent-encoding in canonical spelling: unreserved escapes decoded, other escapes upper-cased,
 * characters that must be escaped escaped (non-ASCII as its bytes), optionally `\` → `/`.
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
      rep = (CLASS[b] & UNRESERVED) !== 0 ? String.fromCharCode(b) : escapeByte(b)
      out += path.slice(last, i) + rep
      i += 2
      last = i + 1
      continue
    }
    if (c === 92) {
      if (!backslashToSlash) continue
      rep = '/'
    } else if (c > 0xff) {
      // Node's targets are latin1 (one char per byte); anything wider is encoded as UTF-8 bytes.
      const cp = path.codePointAt(i) as number
      rep = ''
      for (const b of Buffer.from(String.fromCodePoint(cp), 'utf8')) rep += escapeByte(b)
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
 * The other spellings of the canonical `path` that Fastify's router sends to the same handler:
 * the router's own lookup key under `router` (semicolon cut, duplicate slashes removed, trailing
 * slash trimmed and re-added, lower-cased), the `(`/`%28`-style spellings of the characters
 * find-my-way decodes, and, when the raw `url` is given, the router's view of it (dot segments,
 * backslashes, double or escaped slashes left as the router sees them), spelled canonically.
 * The hook evaluates each as an alternate path (see `decideSpellings`): an alternate can only add
 * a denial from a deny permission. Returns a shared empty array when nothing applies.
 * Limitation: with `caseSensitive: false` only lower-case spellings are produced, so path rules
 * must be written in lower case to cover every case variant.
 */
export function routerPaths (path: string, router: RouterOptions, url?: string): readonly string[] {
  const plain = !router.ignoreTrailingSlash && !router.ignoreDuplicateSlashes && router.caseSensitive &&
    !router.useSemicolonDelimiter
  // The common case in one scan: the target is this path (plus a query) and spells nothing the
  // router would read differently.
  if (plain && (url === undefined || sameTarget(url, path)) && isPlainSpelling(path)) return NO_PATHS
  // Not skipped when url === path: with normalization disabled the raw path is not percent-canonical.
  let routed = url === undefined ? null : routedSpelling(url)
  if (routed === path) routed = null
  if (plain && routed === null && !SUB_DELIM_ANY.test(path)) return NO_PATHS
  const out: string[] = []
  addVariants(out, path, path, router)
  if (routed !== null) addVariants(out, path, routed, router)
  return out.length === 0 ? NO_PATHS : out
}

function sameTarget (url: string, path: string): boolean {
  if (url === path) return true
  const c = url.charCodeAt(path.length)
  return (c === 63 || c === 35) && url.startsWith(path)
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
 * slashes left as sent), in canonical percent-spelling. A request is served only if this
 * spelling, too, is allowed: the router dispatches on it.
 */
export function routedPath (url: string): string | null {
  return routedSpelling(url)
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
  for (const f of forms) {
    add(out, primary, f)
    if (SUB_DELIM_ANY.test(f)) {
      add(out, primary, f.replace(SUB_DELIM_ESCAPED, (m) => String.fromCharCode(parseInt(m.slice(1), 16))))
      add(out, primary, f.replace(SUB_DELIM_LITERAL, (m) => escapeByte(m.charCodeAt(0))))
    }
  }
}

function add (out: string[], primary: string, s: string): void {
  if (s !== primary && !out.includes(s)) out.push(s)
}
