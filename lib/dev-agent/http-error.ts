/**
 * An error carrying the HTTP status the dev agent answers with. Consul replies
 * to most failures with a bare text/plain body, so only status + message matter.
 */
export class DevAgentHttpError extends Error {
  constructor (readonly statusCode: number, message: string) {
    super(message)
    this.name = 'DevAgentHttpError'
  }
}
