"""
The viewer-facing resource tree, one resource per path segment:

    /{kind}                                   kind = segmentations | annotations | predictions
      /{model-uuid}
        /studies/{study-uid}                            GET  study level
          /series/{series-uid}                          GET  series level
            /instances/{sop-instance-uid}               GET  instance level
    /status                                              GET  (when enabled)

Every answer carries CORS headers (``ZhivaSite``); every error, unknown paths
and wrong methods included, is problem+json.
"""
from __future__ import annotations

from twisted.web.resource import Resource
from twisted.web.server import Request

from zhiva.errors import MethodNotAllowed, NotFound
from zhiva.selection import Route, Target
from zhiva.web import problem

KINDS = ("segmentations", "annotations", "predictions")


class Node(Resource):
    """A resource that answers OPTIONS, and errors as problem+json."""

    methods: tuple[bytes, ...] = ()
    missing = "no such resource"

    def __init__(self, app) -> None:
        super().__init__()
        self.app = app

    def render(self, request: Request):
        if request.method == b"OPTIONS":
            return self.app.cors.preflight(request, b", ".join(self.methods + (b"OPTIONS",)))
        if not self.methods:
            return problem.prepare(request, NotFound(f"{request.path.decode('utf-8', 'replace')[:200]}: {self.missing}"))
        if request.method not in self.methods:
            allow = b", ".join(self.methods + (b"OPTIONS",))
            error = MethodNotAllowed(
                f"{request.method.decode('latin-1')[:20]} is not allowed here; use {allow.decode()}",
                headers={"Allow": allow.decode()},
            )
            return problem.prepare(request, error)
        return super().render(request)

    def getChild(self, path: bytes, request: Request) -> Resource:
        return Missing(self.app, "no such resource")


class Missing(Node):
    def __init__(self, app, why: str) -> None:
        super().__init__(app)
        self.missing = why


def _segment(path: bytes) -> str | None:
    try:
        return path.decode("utf-8")
    except UnicodeDecodeError:
        return None


class Root(Node):
    def __init__(self, app) -> None:
        super().__init__(app)
        for kind in KINDS:
            self.putChild(kind.encode(), Kind(app, kind))


class Kind(Node):
    missing = "a model UUID is needed after the kind"

    def __init__(self, app, kind: str) -> None:
        super().__init__(app)
        self.kind = kind

    def getChild(self, path: bytes, request: Request) -> Resource:
        model = _segment(path)
        if not model:
            return Missing(self.app, "a model UUID is needed after the kind")
        return Model(self.app, self.kind, model)


class Model(Node):
    missing = "add /studies/{StudyInstanceUID}"

    def __init__(self, app, kind: str, model: str) -> None:
        super().__init__(app)
        self.putChild(b"studies", Collection(app, "StudyInstanceUID", lambda uid: Study(app, kind, model, uid)))


class Collection(Node):
    """``/studies``, ``/series``, ``/instances``: a UID must follow."""

    def __init__(self, app, what: str, make) -> None:
        super().__init__(app)
        self.missing = f"a {what} is needed here"
        self._make = make

    def getChild(self, path: bytes, request: Request) -> Resource:
        uid = _segment(path)
        if uid is None:
            return Missing(self.app, "path segment is not UTF-8")
        if not uid:
            return Missing(self.app, self.missing)
        return self._make(uid)


class Inference(Node):
    """A leaf of the tree at some level: GET runs the relay."""

    methods = (b"GET",)

    def __init__(self, app, route: Route) -> None:
        super().__init__(app)
        self.route = route

    def render_GET(self, request: Request):
        return self.app.infer(request, self.route)


class Study(Inference):
    def __init__(self, app, kind: str, model: str, study: str) -> None:
        super().__init__(app, Route(kind, model, Target(study)))
        self.putChild(
            b"series",
            Collection(app, "SeriesInstanceUID", lambda uid: Series(app, kind, model, study, uid)),
        )


class Series(Inference):
    def __init__(self, app, kind: str, model: str, study: str, series: str) -> None:
        super().__init__(app, Route(kind, model, Target(study, series)))
        self.putChild(
            b"instances",
            Collection(
                app,
                "SOPInstanceUID",
                lambda uid: Instance(app, kind, model, study, series, uid),
            ),
        )


class Instance(Inference):
    def __init__(self, app, kind: str, model: str, study: str, series: str, sop: str) -> None:
        super().__init__(app, Route(kind, model, Target(study, series, sop)))
