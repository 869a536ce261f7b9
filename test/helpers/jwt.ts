// Keys, key sets and tokens for JWT tests, made with jose: a token issuer per algorithm, and the
// jwt-provider config entries that trust them.
import { generateKeyPairSync } from 'node:crypto'
import type { KeyObject } from 'node:crypto'
import { SignJWT, exportJWK } from 'jose'
import type { JWK, JWTPayload } from 'jose'

export type Alg = 'RS256' | 'RS384' | 'RS512' | 'PS256' | 'PS384' | 'PS512' | 'ES256' | 'ES384' | 'ES512' | 'EdDSA'

export interface Issuer {
  readonly alg: Alg
  readonly kid: string
  readonly privateKey: KeyObject
  readonly jwk: JWK
  /** A signed token; `claims` replaces the defaults (iss, aud, exp in an hour) key by key, `undefined` removes one. */
  sign: (claims?: Record<string, unknown>, header?: Record<string, unknown>) => Promise<string>
}

let counter = 0

function keyPair (alg: Alg): { privateKey: KeyObject, publicKey: KeyObject } {
  if (alg.startsWith('RS') || alg.startsWith('PS')) return generateKeyPairSync('rsa', { modulusLength: 2048 })
  if (alg === 'EdDSA') return generateKeyPairSync('ed25519')
  const curve = { ES256: 'prime256v1', ES384: 'secp384r1', ES512: 'secp521r1' }[alg as 'ES256']
  return generateKeyPairSync('ec', { namedCurve: curve })
}

export async function newIssuer (alg: Alg = 'ES256', iss = 'https://idp.test'): Promise<Issuer> {
  const { privateKey, publicKey } = keyPair(alg)
  const kid = `k${++counter}-${alg}`
  const jwk = { ...(await exportJWK(publicKey)), kid, alg, use: 'sig' }
  const sign = async (claims: Record<string, unknown> = {}, header: Record<string, unknown> = {}): Promise<string> => {
    const now = Math.floor(Date.now() / 1000)
    const body: Record<string, unknown> = { iss, aud: 'api', sub: 'user-1', iat: now, exp: now + 3600, ...claims }
    for (const k of Object.keys(body)) if (body[k] === undefined) delete body[k]
    return await new SignJWT(body as JWTPayload).setProtectedHeader({ alg, kid, typ: 'JWT', ...header }).sign(privateKey)
  }
  return { alg, kid, privateKey, jwk, sign }
}

export function jwks (...issuers: Issuer[]): { keys: JWK[] } {
  return { keys: issuers.map((i) => i.jwk) }
}

/** A jwt-provider entry with the issuers' keys inline (base64, as Consul stores them). */
export function localProvider (name: string, issuers: Issuer[], extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    Kind: 'jwt-provider',
    Name: name,
    Issuer: 'https://idp.test',
    JSONWebKeySet: { Local: { JWKS: Buffer.from(JSON.stringify(jwks(...issuers))).toString('base64') } },
    ...extra
  }
}
