// Verifies one token for one provider with jose: signature (RS*, PS*, ES*, EdDSA) against the
// provider's key set, `exp`/`nbf` within the clock skew, `aud` among the audiences when set, and
// `iss` equal to the issuer (docs/semantics.md#jwt-verification). Returns a reason instead of
// throwing; reasons never contain the token.
import { errors, jwtVerify } from 'jose'
import type { JWTPayload, JWTVerifyGetKey } from 'jose'
import type { ActiveProvider } from './provider'
import { KeySetUnavailableError } from './key-sets'

/** The algorithms the plugin verifies: Envoy's asymmetric ones. `none` never verifies; nor does HMAC (HS*), which Envoy would accept (docs/semantics.md#jwt-envoy). */
export const ALGORITHMS: readonly string[] = Object.freeze([
  'RS256', 'RS384', 'RS512', 'PS256', 'PS384', 'PS512', 'ES256', 'ES384', 'ES512', 'EdDSA', 'Ed25519'
])

export type Verification =
  | {
    readonly ok: true
    readonly payload: Readonly<JWTPayload>
    /** `exp` and `nbf` in ms since the epoch (null when absent), to re-check a cached result. */
    readonly expMs: number | null
    readonly nbfMs: number | null
  }
  | { readonly ok: false, readonly reason: string }

export async function verifyToken (token: string, provider: ActiveProvider, nowMs: number): Promise<Verification> {
  const config = provider.config
  const options = { algorithms: ALGORITHMS as string[], clockTolerance: config.clockSkewSeconds, currentDate: new Date(nowMs) }
  try {
    let payload: JWTPayload
    try {
      // The key set's lookup is jose's own (lib/jwt/key-sets.ts says why its type is not named there).
      payload = (await jwtVerify(token, provider.keys.getKey as JWTVerifyGetKey, options)).payload
    } catch (err) {
      // Several keys fit (a kid shared during a rotation, or no kid): Envoy tries each of them.
      if (!(err instanceof errors.JWKSMultipleMatchingKeys)) throw err
      payload = await verifyWithAny(token, err as unknown as AsyncIterable<Parameters<typeof jwtVerify>[1]>, options)
    }
    // Exact equality, also for an empty Issuer (docs/semantics.md#jwt-verification).
    if (payload.iss !== config.issuer) return { ok: false, reason: 'iss is not the provider\'s Issuer' }
    if (config.audiences.length > 0 && !audienceAllowed(payload.aud, config.audiences)) {
      return { ok: false, reason: 'aud is not among the provider\'s Audiences' }
    }
    return {
      ok: true,
      payload: Object.freeze(payload),
      expMs: typeof payload.exp === 'number' ? payload.exp * 1000 : null,
      nbfMs: typeof payload.nbf === 'number' ? payload.nbf * 1000 : null
    }
  } catch (err) {
    return { ok: false, reason: reasonOf(err) }
  }
}

/** The first candidate key the token verifies with; the last failure when none does. */
async function verifyWithAny (token: string, candidates: AsyncIterable<Parameters<typeof jwtVerify>[1]>, options: Parameters<typeof jwtVerify>[2]): Promise<JWTPayload> {
  let failure: unknown = new errors.JWSSignatureVerificationFailed()
  for await (const key of candidates) {
    try {
      return (await jwtVerify(token, key, options)).payload
    } catch (err) {
      failure = err
    }
  }
  throw failure
}

/**
 * Envoy's audience check (jwt_verify_lib CheckAudience): one of the token's audiences equals one
 * of the provider's, both compared without an `http://` or `https://` in front and a `/` at the end.
 */
function audienceAllowed (aud: unknown, audiences: readonly string[]): boolean {
  const tokenAudiences = typeof aud === 'string' ? [aud] : Array.isArray(aud) ? aud.filter((a): a is string => typeof a === 'string') : []
  const allowed = new Set(audiences.map(sanitizeAudience))
  return tokenAudiences.some((a) => allowed.has(sanitizeAudience(a)))
}

function sanitizeAudience (aud: string): string {
  const start = aud.startsWith('http://') ? 7 : aud.startsWith('https://') ? 8 : 0
  const end = aud.endsWith('/') && aud.length > start ? aud.length - 1 : aud.length
  return aud.slice(start, end)
}

function reasonOf (err: unknown): string {
  if (err instanceof errors.JWTExpired) return 'token expired'
  if (err instanceof errors.JWTClaimValidationFailed) {
    if (err.claim === 'nbf') return 'token not yet valid (nbf)'
    return `claim ${err.claim} is invalid`
  }
  if (err instanceof errors.JWSSignatureVerificationFailed) return 'bad signature'
  if (err instanceof errors.JWKSNoMatchingKey) return 'no key of the key set matches the token'
  if (err instanceof errors.JOSEAlgNotAllowed) return 'algorithm not allowed'
  if (err instanceof KeySetUnavailableError) return `key set unavailable: ${err.message}`
  if (err instanceof errors.JWSInvalid || err instanceof errors.JWTInvalid) return 'malformed token'
  if (err instanceof errors.JOSENotSupported) return 'unsupported token (a crit header or key type jose does not handle)'
  /* c8 ignore next 2 -- what jose raises for a token is handled above; kept so anything unforeseen (a key jose cannot import) still denies with a reason. */
  return `verification failed: ${(err as Error).name}`
}
