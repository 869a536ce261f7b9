// Where a provider's token is looked for in a request (docs/semantics.md#jwt-locations): headers
// (with an optional value prefix), query parameters and cookies, in that order, the first token
// found winning. Read from the request as received (rawHeaders, the raw target), never from what
// a hook may have rewritten.

export interface TokenLocation {
  readonly kind: 'header' | 'query' | 'cookie'
  /** Header names are lower case; query parameter and cookie names as configured. */
  readonly name: string
  /** Header only: the text before the token, e.g. `Bearer `. */
  readonly prefix: string
  /** Header only: false removes the header before the handler runs (docs/semantics.md#jwt-forwarding). */
  readonly forward: boolean
}

/** Consul's documented default: `Authorization: Bearer <token>`, then the `access_token` query parameter. */
export const DEFAULT_LOCATIONS: readonly TokenLocation[] = Object.freeze([
  Object.freeze({ kind: 'header', name: 'authorization', prefix: 'Bearer ', forward: false }),
  Object.freeze({ kind: 'query', name: 'access_token', prefix: '', forward: true })
] as const)

export interface FoundToken {
  readonly token: string
  readonly location: TokenLocation
  /**
   * The header or query parameter it was found in occurs more than once: the application reads
   * another value there (Node keeps a header's first value or joins them, the query parser makes
   * an array), so the request is refused (docs/semantics.md#jwt-locations).
   */
  readonly repeated: boolean
}

const KIND_ORDER = ['header', 'query', 'cookie'] as const

/** The first token found at `locations`: headers first, then query parameters, then cookies. */
export function findToken (locations: readonly TokenLocation[], rawHeaders: readonly string[], url: string): FoundToken | null {
  for (const kind of KIND_ORDER) {
    for (const location of locations) {
      if (location.kind !== kind) continue
      const token = kind === 'header'
        ? fromHeader(rawHeaders, location.name, location.prefix)
        : kind === 'query' ? fromQuery(url, location.name) : fromCookie(rawHeaders, location.name)
      if (token !== null) return { token, location, repeated: occurrences > 1 }
    }
  }
  return null
}

// How many times the header or query parameter last read by fromHeader or fromQuery occurs.
let occurrences = 0

function fromHeader (rawHeaders: readonly string[], name: string, prefix: string): string | null {
  let token: string | null = null
  occurrences = 0
  for (let i = 0; i < rawHeaders.length; i += 2) {
    if ((rawHeaders[i] as string).length !== name.length || (rawHeaders[i] as string).toLowerCase() !== name) continue
    occurrences++
    if (token !== null) continue
    const value = (rawHeaders[i + 1] as string).trim()
    if (!value.startsWith(prefix)) continue
    const found = value.slice(prefix.length).trim()
    if (found !== '') token = found
  }
  return token
}

function fromQuery (url: string, name: string): string | null {
  occurrences = 0
  const q = url.indexOf('?')
  if (q === -1) return null
  const hash = url.indexOf('#', q)
  const query = url.slice(q + 1, hash === -1 ? undefined : hash)
  let token: string | null = null
  for (const pair of query.split('&')) {
    const eq = pair.indexOf('=')
    // `name` alone is the parameter with an empty value, to the query parser as here.
    if (decode(eq === -1 ? pair : pair.slice(0, eq)) !== name) continue
    occurrences++
    if (token !== null || eq === -1) continue
    const value = decode(pair.slice(eq + 1))
    if (value !== null && value !== '') token = value
  }
  return token
}

function fromCookie (rawHeaders: readonly string[], name: string): string | null {
  // Cookie parsers keep a name's first value, as this does: a repeated cookie is read alike.
  occurrences = 0
  for (let i = 0; i < rawHeaders.length; i += 2) {
    if ((rawHeaders[i] as string).toLowerCase() !== 'cookie') continue
    for (const part of (rawHeaders[i + 1] as string).split(';')) {
      const eq = part.indexOf('=')
      if (eq === -1 || part.slice(0, eq).trim() !== name) continue
      let value = part.slice(eq + 1).trim()
      if (value.length >= 2 && value.startsWith('"') && value.endsWith('"')) value = value.slice(1, -1)
      // The first cookie of the name is the one the application reads, empty or not.
      return value === '' ? null : value
    }
  }
  return null
}

function decode (text: string): string | null {
  try {
    return decodeURIComponent(text.replace(/\+/g, ' '))
  } catch {
    return null
  }
}
