"""
The extension points of the proxy.

Each built-in DICOM source, model wire protocol, PACS auth scheme and task is
a plugin providing one of these interfaces (see ``zhiva.plugins``); a new one
is a new plugin module. This module imports nothing of ours.
"""
from zope.interface import Attribute, Interface
from twisted.internet.interfaces import IPushProducer


class IInstanceConsumer(Interface):
    """
    Receives DICOM Part 10 instances as they stream out of a source.

    An instance arrives as ``instanceStarted``, any number of
    ``instanceData`` chunks (the file's bytes, in order) and
    ``instanceEnded``; never two at once.
    """

    def instanceStarted() -> None:
        ...

    def instanceData(data: bytes) -> None:
        ...

    def instanceEnded() -> None:
        ...


class IRetrieval(IPushProducer):
    """
    One retrieve in progress: pausable (the consumer is slow), stoppable (the
    viewer left) and observable through ``done``.
    """

    done = Attribute(
        "Deferred firing with the number of instances delivered, or failing "
        "with a zhiva.errors.ProblemError"
    )


class IDicomSource(Interface):
    """
    Where instances come from for one configured server (a PACS over
    DICOMweb, a folder, ...).
    """

    def retrieve(target, consumer: IInstanceConsumer) -> IRetrieval:
        """
        Stream every instance under ``target`` (a ``zhiva.selection.Target``:
        study, series or one instance) into ``consumer``.
        """

    def close():
        """
        Release connections; returns a Deferred.
        """


class IDicomSourceFactory(Interface):
    """
    A plugin that builds sources for the server URIs of some schemes.
    """

    name = Attribute("Plugin name, for logs")
    schemes = Attribute("URI schemes handled, e.g. ('http', 'https')")

    def open(server, reactor, auth) -> IDicomSource:
        """
        A source for ``server`` (a ``zhiva.config.ServerConfig``) that signs
        its requests with ``auth`` (an ``IPacsAuth``).
        """


class IPacsAuth(Interface):
    """
    Credentials for one server's requests, kept fresh.
    """

    def headers():
        """
        Deferred firing with a dict of header name to value (str) to send.
        """

    def rejected(sent):
        """
        The PACS answered 401 to a request sent with header dict ``sent``.
        Deferred firing True when new credentials are ready and one retry is
        worthwhile, False otherwise.
        """

    def describe():
        """
        Optional. A dict of public facts for the status page, e.g.
        ``{"signedIn": True, "accessTokenExpiresAt": "2025-01-01T12:00:00+00:00"}``;
        never a token or password.
        """


class IPacsAuthScheme(Interface):
    """
    A plugin for one ``authType`` of servers.json.
    """

    name = Attribute("The authType value, e.g. 'basicAuth'; '' means none")
    requires = Attribute("Config fields that must be set, e.g. ('login', 'password')")

    def session(server, client, reactor, state_dir=None) -> IPacsAuth:
        """
        Auth state for ``server`` using ``client`` (a treq HTTPClient) for any
        sign-in calls. ``state_dir`` (a ``pathlib.Path`` or None) is where
        tokens may be kept across restarts (``--state-dir``).
        """


class IPlanEncoder(Interface):
    """
    Turns a fetch plan and the instances flowing through it into a request
    body. Every method returns the bytes to send next (maybe empty).
    """

    contentType = Attribute("Content-Type of the body, bytes")

    def begin() -> bytes:
        ...

    def beginFetch(index: int) -> bytes:
        """
        Fetch number ``index`` of ``plan.fetches`` starts.
        """

    def beginInstance(index: int) -> bytes:
        """
        Instance number ``index`` within the current fetch starts.
        """

    def instanceData(data: bytes) -> bytes | list[bytes]:
        """
        The encoding of the next bytes of the instance; a list of pieces when
        one big output object would cost more than it saves (page faults).
        """

    def endInstance() -> bytes:
        ...

    def endFetch() -> bytes:
        ...

    def end() -> bytes:
        ...


class IModelProtocol(Interface):
    """
    A plugin for one model wire protocol (``protocol`` in models.json).
    """

    name = Attribute("Protocol name, e.g. 'zhiva-json'")

    def encoder(plan) -> IPlanEncoder:
        """
        An encoder for one request following ``plan`` (a
        ``zhiva.selection.Plan``).
        """


class ITask(Interface):
    """
    A plugin for one model ``task``: which route kind it serves and what a
    valid result looks like.
    """

    name = Attribute("The task value in models.json, e.g. 'segmentation'")
    kind = Attribute("The route segment, e.g. 'segmentations'")

    def check(result, route) -> None:
        """
        Raise ``ValueError`` with a precise message when ``result`` (decoded
        JSON) is not a valid answer to ``route`` (a ``zhiva.selection.Route``).
        Called in a worker thread: results can be ~100 MB.
        """


class IModel(Interface):
    """
    A plugin for a model that runs inside the proxy (``"uri": "plugin:NAME"``
    in models.json): how a team tries its model before wrapping it in an
    HTTP server. The proxy runs it in a bounded worker pool, never on the
    reactor thread, with the same timeout and result checks as a remote model.
    """

    name = Attribute("The NAME of plugin:NAME")

    def infer(inputs, target):
        """
        Return the task's result object (SPEC.md "Result shapes").

        ``inputs`` is a list of pydicom Datasets; with data filters it is the
        zhiva-json structure of SPEC.md with Datasets in place of instances.
        ``target`` is the requested ``zhiva.selection.Target``.
        """
